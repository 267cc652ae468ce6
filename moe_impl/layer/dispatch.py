"""Dropless dispatch: pack routed slots into per-expert blocks for batched matmuls.

A *slot* is one (token, expert) assignment with its gate value; a token routed to k experts owns k
slots. Slots are sorted by expert (stably, so tokens keep their batch order inside an expert, as
the SparseDispatcher of tensor2tensor/utils/expert_utils.py does) and cut into blocks of C rows,
each holding one expert's slots, zero-gated padding filling its tail. The experts then run as
batched matmuls over blocks: no Python loop over experts, no capacity and no dropped token by
default, and no tensor of size tokens x experts (only O(slots) rows and O(experts) counts).

Two layouts, chosen per batch from the slot counts by a cost model (`choose_block_size`):
- in place: one block per expert, C = the largest count; the weights are used as they are stored,
  no copy (best when most experts receive many tokens);
- gathered: blocks only for experts that received slots, C a power of two (or the largest count);
  each block's weights are gathered (best when few experts are active, e.g. 131072 experts).

A third layout, `make_plan(..., grouped=True)`, is for a grouped GEMM (moe_impl/layer/grouped.py,
`torch._grouped_mm`), which takes groups of any size: one run of the kept slots sorted by expert,
no padding (one "block" of R = kept slots rows, C = R, no block map), expert e owning the next
kept_E[e] rows. It is used where `grouped.choose_kernel` picks the grouped kernel (CUDA, Hopper or
later, bf16); capacity and dropping behave as in the blocked layouts. Dropless, it reads nothing
back to the host (its sizes are the slot count, its counts come from the sorted ids); with a
capacity the number of kept rows is read back once (`num_dropped`). The blocked layouts read the
counts back to choose their blocks.

Shape suffixes: N = slots, E = experts, L = blocks, C = rows per block, R = L*C buffer rows,
D = d_model, H = expert hidden.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from moe_impl.layer.workspace import Workspace, empty

# Block costs in rows of expert compute (measured at d=64, h=128 on our CPU; see
# docs/performance.md): a batched matmul reads each block's weights whatever its row count (~16
# rows' worth), and a gathered block first copies them (another ~16). tests/test_dispatch.py
# works examples of the model by hand.
BLOCK_COST_ROWS = 16
GATHER_COST_ROWS = 16
# Splitting an expert over several gathered blocks makes its sparse gradient need a segment sum
# (a zero-filled buffer of all active experts' weights), charged per active expert.
DEDUPE_COST_ROWS = 32


class DispatchPlan(NamedTuple):
    slot_of_row_R: Tensor  # slot held by each buffer row; padding rows hold N (a zero-gated dummy)
    token_of_row_R: Tensor  # token of each buffer row (0 for padding: read, then weighted by 0)
    row_of_slot_N: Tensor  # buffer row of each slot; R (a zero row) where the slot was dropped
    block_expert_L: Tensor | None  # expert of each block; None in place or grouped (block e = e)
    block_size: int  # rows per block; grouped: all R rows in one block (1 when R = 0: no block)
    counts_E: Tensor  # slots routed to each expert, before any capacity limit (int64)
    num_dropped: int  # slots dropped by the capacity limit (0 when dropless)
    kept_E: Tensor | None = None  # slots kept per expert (counts_E capped by the capacity)
    grouped: bool = False  # the grouped layout: rows sorted by expert, no padding, one block

    @property
    def num_blocks(self) -> int:
        return self.slot_of_row_R.numel() // self.block_size


def choose_block_size(counts_E: Tensor) -> tuple[int, bool]:
    """Block size C and whether to use the in-place layout, by estimated cost in rows:
    in place E·(max count + BLOCK_COST_ROWS); gathered L(C)·(C + BLOCK_COST_ROWS + GATHER_COST_ROWS)
    (+ DEDUPE_COST_ROWS per active expert when C < max count splits some expert), for C the max
    count or a smaller power of two, L(C) = Σ_e ceil(count_e / C)."""
    num_experts = counts_E.numel()
    max_count = int(counts_E.max()) if num_experts else 0
    if max_count == 0:
        return 1, False
    sizes = [max_count] + [2**j for j in range(max_count.bit_length()) if 2**j < max_count]
    sizes_S = torch.tensor(sizes, device=counts_E.device)
    blocks_S = ((counts_E[None, :] + sizes_S[:, None] - 1) // sizes_S[:, None]).sum(1)
    active = int((counts_E > 0).sum())
    split_S = (blocks_S > active).long()
    cost_S = blocks_S * (sizes_S + BLOCK_COST_ROWS + GATHER_COST_ROWS)
    costs = (cost_S + split_S * DEDUPE_COST_ROWS * active).tolist()
    best = min(range(len(sizes)), key=costs.__getitem__)
    if num_experts * (max_count + BLOCK_COST_ROWS) <= costs[best]:
        return max_count, True
    return sizes[best], False


def make_plan(
    expert_N: Tensor,
    token_N: Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    grouped: bool = False,
) -> DispatchPlan:
    """Sort slots by expert and assign each a buffer row.

    `capacity` (not in the paper, which drops nothing) keeps at most that many slots per expert, in
    batch order, and drops the rest: their gate contributes nothing, as in t2t's TruncatingDispatcher.
    `grouped` lays the kept slots out as one unpadded run sorted by expert (module docstring),
    without a read back to the host when dropless; else the blocked layout `choose_block_size` picks.
    """
    num_slots = expert_N.numel()
    device = expert_N.device
    sorted_N, order_N = torch.sort(expert_N, stable=True)
    if grouped:  # from the sorted ids: bincount reads the largest id back to size its output
        bounds = torch.arange(num_experts + 1, device=device)
        counts_E = torch.diff(torch.searchsorted(sorted_N, bounds))
    else:
        counts_E = torch.bincount(expert_N, minlength=num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(num_slots, device=device) - start_E[sorted_N]
    kept_E = counts_E
    num_dropped = 0
    if capacity is not None:
        kept_E = counts_E.clamp(max=capacity)
        keep_N = rank_N < capacity
        num_dropped = num_slots - int(keep_N.sum())
        if num_dropped:
            sorted_N, order_N, rank_N = sorted_N[keep_N], order_N[keep_N], rank_N[keep_N]

    if grouped:
        num_rows = order_N.numel()
        slot_of_row_R = order_N
        row_of_slot_N = torch.full((num_slots,), num_rows, dtype=torch.long, device=device)
        row_of_slot_N[order_N] = torch.arange(num_rows, device=device)
        token_of_row_R = token_N[order_N]
        return DispatchPlan(
            slot_of_row_R,
            token_of_row_R,
            row_of_slot_N,
            None,
            max(num_rows, 1),
            counts_E,
            num_dropped,
            kept_E,
            grouped=True,
        )

    block_size, in_place = choose_block_size(kept_E)
    if in_place:
        blocks_E = torch.ones_like(kept_E)
        block_expert_L = None
    else:
        blocks_E = (kept_E + block_size - 1) // block_size
        block_expert_L = torch.repeat_interleave(torch.arange(num_experts, device=device), blocks_E)
    first_block_E = torch.cumsum(blocks_E, 0) - blocks_E
    num_rows = int(blocks_E.sum()) * block_size

    row_N = (first_block_E[sorted_N] + rank_N // block_size) * block_size + rank_N % block_size
    slot_of_row_R = torch.full((num_rows,), num_slots, dtype=torch.long, device=device)
    slot_of_row_R[row_N] = order_N
    row_of_slot_N = torch.full((num_slots,), num_rows, dtype=torch.long, device=device)
    row_of_slot_N[order_N] = row_N
    token_of_row_R = torch.cat([token_N, token_N.new_zeros(1)])[slot_of_row_R]
    return DispatchPlan(
        slot_of_row_R,
        token_of_row_R,
        row_of_slot_N,
        block_expert_L,
        block_size,
        counts_E,
        num_dropped,
        kept_E,
    )


def every_expert_plan(top_idx_BK: Tensor) -> DispatchPlan:
    """make_plan's plan, the same tensors, when every token is routed to every expert (k = E,
    dropless, blocked: the flat layer with k = num_experts, e.g. the paper's MoE-4 with k = 4),
    from the gate's choices alone. Expert e then receives every token, in batch order (the stable
    sort), so the in-place layout has one block of B rows per expert and slot b·k+j sits at row
    top_idx[b, j]·B + b: no sort, no counts and no read back. Needs at least one token."""
    num_tokens, num_experts = top_idx_BK.shape
    device = top_idx_BK.device
    tokens_B = torch.arange(num_tokens, device=device)
    row_of_slot_N = (top_idx_BK * num_tokens + tokens_B[:, None]).reshape(-1)
    slot_of_row_R = torch.empty_like(row_of_slot_N)
    slot_of_row_R[row_of_slot_N] = torch.arange(row_of_slot_N.numel(), device=device)
    counts_E = torch.full((num_experts,), num_tokens, dtype=torch.long, device=device)
    return DispatchPlan(
        slot_of_row_R,
        tokens_B.repeat(num_experts),
        row_of_slot_N,
        None,
        num_tokens,
        counts_E,
        0,
        counts_E,
    )


def select_rows(t: Tensor, idx: Tensor, workspace: Workspace | None = None) -> Tensor:
    """t[idx] along dim 0 for a tensor of any rank, into `workspace` memory where given (then not
    differentiable: for the expert functions' own forward and backward). NOTE: index_select on a
    3-D CPU tensor is ~7x slower than on its 2-D view (100 vs 14 ms to gather 4096 expert
    matrices), hence the view."""
    width = math.prod(t.shape[1:])
    flat = t.reshape(t.shape[0], width)
    if workspace is None:  # differentiable (out= is not)
        return flat.index_select(0, idx).view(idx.numel(), *t.shape[1:])
    out = torch.index_select(flat, 0, idx, out=workspace.take((idx.numel(), width), t))
    return out.view(idx.numel(), *t.shape[1:])


def add_rows(
    shape: tuple[int, ...], idx: Tensor, values: Tensor, out: Tensor | None = None
) -> Tensor:
    """zeros(shape) with values[j] added at row idx[j] (duplicates summed), through a 2-D view;
    into `out` (zeroed first, any contiguous tensor of `shape`) where given."""
    width = math.prod(shape[1:])
    out = values.new_zeros(shape[0], width) if out is None else out.view(shape[0], width).zero_()
    return out.index_add_(0, idx, values.reshape(values.shape[0], width)).view(shape)


def _take_rows(
    values: Tensor, idx: Tensor, has_sentinel: bool, workspace: Workspace | None = None
) -> Tensor:
    """values[idx] where idx == len(values) selects a zero row (only checked when it can occur),
    through a 2-D view, into `workspace` memory where given."""
    num = values.shape[0]
    width = math.prod(values.shape[1:])
    if has_sentinel and num == 0:
        return values.new_zeros((idx.numel(), *values.shape[1:]))
    sentinel = idx == num if has_sentinel else None
    if sentinel is not None:
        idx = idx.clamp(max=num - 1)
    out = empty(workspace, (idx.numel(), width), values)
    torch.index_select(values.reshape(num, width), 0, idx, out=out)
    if sentinel is not None:  # the rows that select the zero row: few (padding, dropped slots)
        out.index_fill_(0, sentinel.nonzero().squeeze(1), 0)
    return out.view(idx.numel(), *values.shape[1:])


class _GatherTokens(torch.autograd.Function):
    """x_R = x_B[token_of_row]. The backward avoids index_add (a per-row loop on CPU): each token
    owns k consecutive slots, so its gradient is its slots' rows gathered back and summed."""

    @staticmethod
    def forward(ctx, x_BD, token_of_row_R, row_of_slot_N, k, dropped, workspace):
        ctx.save_for_backward(row_of_slot_N)
        ctx.k = k
        ctx.dropped = dropped
        ctx.workspace = workspace
        return _take_rows(x_BD, token_of_row_R, False, workspace)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        (row_of_slot_N,) = ctx.saved_tensors
        ws = ctx.workspace
        grad_ND = _take_rows(grad_RD, row_of_slot_N, ctx.dropped, ws)
        grad_BKD = grad_ND.view(-1, ctx.k, grad_ND.shape[-1])
        grad_BD = empty(ws, (grad_BKD.shape[0], grad_BKD.shape[2]), grad_ND)
        return torch.sum(grad_BKD, 1, out=grad_BD), None, None, None, None, None


class _Permute(torch.autograd.Function):
    """values[index] (a zero row where index == len(values)); the backward is the gather by the
    inverse map, grad[inverse] (a zero row where inverse == len(grad))."""

    @staticmethod
    def forward(ctx, values, index, inverse, zero_forward, zero_backward, workspace):
        ctx.save_for_backward(inverse)
        ctx.zero_backward = zero_backward
        ctx.workspace = workspace
        return _take_rows(values, index, zero_forward, workspace)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        grad = _take_rows(grad, inverse, ctx.zero_backward, ctx.workspace)
        return grad, None, None, None, None, None


def gather_tokens(
    x_BD: Tensor,
    token_of_row_R: Tensor,
    row_of_slot_N: Tensor,
    k: int,
    *,
    dropped: bool = False,
    workspace: Workspace | None = None,
) -> Tensor:
    """x_BD[token_of_row_R], for rows that hold the slots of tokens owning k consecutive slots each
    (token b: slots b·k ... b·k+k-1), slot n at row row_of_slot_N[n]; `dropped` says some slots
    have no row (row_of_slot_N == R). Also the send buffer of moe_impl/parallel/routing.py.
    `workspace` (workspace.py) holds the memory of the rows and of their gradient."""
    return _GatherTokens.apply(x_BD, token_of_row_R, row_of_slot_N, k, dropped, workspace)


def permute_rows(
    values: Tensor,
    index: Tensor,
    inverse: Tensor,
    *,
    zero_forward: bool = False,
    zero_backward: bool = False,
    workspace: Workspace | None = None,
) -> Tensor:
    """values[index] along dim 0, differentiable through the inverse map (grad[inverse]). The
    flags say that index (inverse) may hold len(values) (len(index)) to select a zero row.
    `workspace` holds the memory of the result and of its gradient."""
    return _Permute.apply(values, index, inverse, zero_forward, zero_backward, workspace)


def dispatch(
    x_BD: Tensor, plan: DispatchPlan, k: int, workspace: Workspace | None = None
) -> Tensor:
    """Token rows laid out in the block buffer, (R, D); the slots of token b are b·k ... b·k+k-1."""
    return gather_tokens(
        x_BD,
        plan.token_of_row_R,
        plan.row_of_slot_N,
        k,
        dropped=plan.num_dropped > 0,
        workspace=workspace,
    )


def from_rows(values_R: Tensor, plan: DispatchPlan, workspace: Workspace | None = None) -> Tensor:
    """Per-row results back in slot order, (N, ...): dropped slots get 0; the backward gives the
    padding rows 0."""
    padded = plan.slot_of_row_R.numel() > plan.row_of_slot_N.numel() - plan.num_dropped
    return permute_rows(
        values_R,
        plan.row_of_slot_N,
        plan.slot_of_row_R,
        zero_forward=plan.num_dropped > 0,
        zero_backward=padded,
        workspace=workspace,
    )
