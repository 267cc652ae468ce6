"""A bank of feed-forward experts, E_i(x) = relu(x · w_in[i]) · w_out[i] (paper Sec. 2, App. C).

No biases, as in the paper's parameter counts (App. C) and tensor2tensor's experts. The
weights of all experts live in two stacked parameters so that dispatch can run them as batched
matmuls over blocks (dispatch.py, expert_mlp.py) or as grouped matmuls over an unpadded run of rows
sorted by expert (a grouped plan, grouped.py); this module knows nothing about gating.

Initialisation (our choice; t2t uses Glorot-uniform and scales the output layer by sqrt(d/h)):
w_in ~ U(±sqrt(6/d)) (He: variance 2/d, for the ReLU) and w_out ~ U(±sqrt(3/h)) (variance 1/h), so
that each expert maps a unit-variance input to an output of variance about 1 whatever d and h.

Shape suffixes: B = tokens, N = slots, E = experts, D = d_model, H = d_hidden, R = buffer rows,
L = blocks, C = rows per block.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moe_impl.layer.combine import combine_rows
from moe_impl.layer.compute_copy import ComputeCopy
from moe_impl.layer.dispatch import DispatchPlan, dispatch, from_rows
from moe_impl.layer.expert_mlp import block_expert_mlp, compute_dtype
from moe_impl.layer.grouped import grouped_expert_mlp
from moe_impl.layer.wide import wide_expert_mlp
from moe_impl.layer.workspace import Workspace, empty

if TYPE_CHECKING:
    from moe_impl.layer.compiled import CompiledRouting

# Experts are initialised in chunks of this many, each chunk from its own generator seeded by
# (one seed drawn from torch's global RNG, chunk index): expert i's initial weights then depend only
# on that seed and i, so a bank sharded over ranks (moe_impl/parallel) starts from exactly the
# weights of the single-process bank without any rank materialising the whole bank.
INIT_CHUNK = 256


class ExpertBank(nn.Module):
    """`num_experts` two-layer ReLU experts with weights w_in (E, D, H) and w_out (E, H, D).

    `sparse_grad=True` makes the weight gradients sparse COO tensors over the experts that received
    tokens (sparse_dim 1, like nn.Embedding(sparse=True)): memory then grows with the active experts,
    not with all of them. Optimizers must accept sparse gradients (torch.optim.SparseAdam, Adagrad,
    or moe_impl.train.optim.FactoredAdam).

    A shard of a larger bank holds experts first_expert ... first_expert + num_experts - 1 of
    `total_experts` and is initialised exactly as those rows of the whole bank would be.

    Under autocast the bank keeps w_in and w_out in the compute dtype between forwards, recast
    where they changed (compute_copy.py: 2 bytes per weight in bf16); `keep_compute_copies =
    False` casts them in every forward instead. Outputs and gradients are the same either way.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        sparse_grad: bool,
        first_expert: int = 0,
        total_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.sparse_grad = sparse_grad
        self.first_expert = first_expert
        self.total_experts = num_experts if total_experts is None else total_experts
        if not 0 <= first_expert <= first_expert + num_experts <= self.total_experts:
            raise ValueError(
                f"an expert shard [{first_expert}, {first_expert + num_experts}) must lie inside "
                f"[0, total_experts={self.total_experts})"
            )
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.workspace = Workspace()  # large tensors' memory, reused across steps (workspace.py)
        # the compiled combine (compiled.py; MoELayer.compile_routing), None for the eager one
        self.compiled: CompiledRouting | None = None
        # w_in's and w_out's copies in the compute dtype (compute_copy.py); not state
        self.compute_copies = (ComputeCopy(), ComputeCopy())
        self._keep_compute_copies = True
        self.reset_parameters()

    def __getstate__(self) -> dict:
        """A pickled bank (torch.save, copy.deepcopy) combines eagerly: torch.compile's wrappers
        do not pickle."""
        return {**self.__dict__, "compiled": None}

    @property
    def keep_compute_copies(self) -> bool:
        """Whether forwards under autocast keep the weights' compute-dtype copies (default)."""
        return self._keep_compute_copies

    @keep_compute_copies.setter
    def keep_compute_copies(self, keep: bool) -> None:
        self._keep_compute_copies = bool(keep)
        if not keep:
            self.drop_compute_copies()

    def drop_compute_copies(self) -> None:
        """Free the compute-dtype copies; the next forward under autocast recasts the weights
        (needed only after a write the copies cannot see: through `w_in.data`, compute_copy.py)."""
        for copy in self.compute_copies:
            copy.clear()

    def _weight_copies(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(w_in, w_out) in autocast's compute dtype, from the kept copies; None where the kernels
        cast them themselves: copies off, no autocast, the weights already in that dtype, or
        torch.compile tracing (a copy's validity is read on the host: pointers, versions)."""
        dtype = compute_dtype(x)
        if (
            not self._keep_compute_copies
            or not torch.is_autocast_enabled(x.device.type)
            or dtype == self.w_in.dtype
            or torch.compiler.is_compiling()
        ):
            return None
        copy_in, copy_out = self.compute_copies
        return copy_in.get(self.w_in, dtype), copy_out.get(self.w_out, dtype)

    def reset_parameters(self) -> None:
        """w_in ~ U(±sqrt(6/d)), w_out ~ U(±sqrt(3/h)), drawn chunk by chunk (INIT_CHUNK)."""
        d_model, d_hidden = self.w_in.shape[1:]
        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # the one draw from the global RNG
        if self.w_in.is_meta:  # shapes only (the benchmark's planning)
            return
        bound_in, bound_out = math.sqrt(6.0 / d_model), math.sqrt(3.0 / d_hidden)
        lo, hi = self.first_expert, self.first_expert + self.w_in.shape[0]
        generator = torch.Generator()
        with torch.no_grad():
            for chunk in range(lo // INIT_CHUNK, -(-hi // INIT_CHUNK)):
                start = chunk * INIT_CHUNK
                size = min(INIT_CHUNK, self.total_experts - start)
                generator.manual_seed(seed + chunk)
                w_in = torch.empty(size, d_model, d_hidden, device="cpu").uniform_(
                    -bound_in, bound_in, generator=generator
                )
                w_out = torch.empty(size, d_hidden, d_model, device="cpu").uniform_(
                    -bound_out, bound_out, generator=generator
                )
                a, b = max(lo, start), min(hi, start + size)
                self.w_in[a - lo : b - lo] = w_in[a - start : b - start]
                self.w_out[a - lo : b - lo] = w_out[a - start : b - start]

    def slot_outputs(self, x_BD: Tensor, plan: DispatchPlan, k: int) -> Tensor:
        """E_expert(x_token) of every slot, (N, D) in slot order; the slots of token b are
        b·k ... b·k+k-1. A grouped plan (`plan.grouped`) runs the grouped kernel, else the blocks."""
        ws = None if plan.grouped else self.workspace
        return from_rows(self.row_outputs(x_BD, plan, k), plan, ws)

    def row_outputs(self, x_BD: Tensor, plan: DispatchPlan, k: int) -> Tensor:
        """E_expert(x_token) of every row of the plan's buffer, (R, D), padding rows included."""
        d_model = x_BD.shape[1]
        copies = self._weight_copies(x_BD)
        if plan.grouped:
            assert plan.kept_E is not None  # make_plan sets it
            x_RD = dispatch(x_BD, plan, k)
            return grouped_expert_mlp(
                x_RD,
                self.w_in,
                self.w_out,
                plan.kept_E,
                sparse_grad=self.sparse_grad,
                copies=copies,
            )
        ws = self.workspace
        x_LCD = dispatch(x_BD, plan, k, ws).view(plan.num_blocks, plan.block_size, d_model)
        y_LCD = block_expert_mlp(
            x_LCD,
            self.w_in,
            self.w_out,
            plan.block_expert_L,
            plan.counts_E,
            sparse_grad=self.sparse_grad,
            buffers=ws,
            copies=copies,
        )
        return y_LCD.view(-1, d_model)

    def wide(self, x_BD: Tensor, gate_BE: Tensor) -> Tensor:
        """y_b = Σ_e gate[b, e] · E_e(x_b) over all experts, as one wide FFN (wide.py): the
        layer's output when every token is routed to every expert (k = E, dropless)."""
        copies = self._weight_copies(x_BD)
        # NOTE: the workspace only on CPU, where glibc would otherwise map and unmap these large
        # temporaries every step; on a GPU the caching allocator reuses memory without keeping
        # the activations' buffers between steps
        ws = self.workspace if x_BD.device.type == "cpu" else None
        return wide_expert_mlp(x_BD, gate_BE, self.w_in, self.w_out, workspace=ws, copies=copies)

    def forward(self, x_BD: Tensor, gate_N: Tensor, plan: DispatchPlan, k: int) -> Tensor:
        """y_b = Σ over the k slots of token b of gate · E_expert(x_b) (paper Eq. 1); the slots of
        token b are b·k ... b·k+k-1."""
        num_tokens, d_model = x_BD.shape
        gate_BK = gate_N.view(num_tokens, k)
        if self.compiled is not None and plan.slot_of_row_R.numel() > 0:
            values_RD = self.row_outputs(x_BD, plan, k)
            y_BD = self.compiled.combine(values_RD, gate_BK, plan.row_of_slot_N, plan.slot_of_row_R)
            return y_BD.to(x_BD.dtype)
        if not plan.grouped and plan.slot_of_row_R.numel() > 0:
            values_RD = self.row_outputs(x_BD, plan, k)
            return combine_rows(values_RD, gate_BK, plan, self.workspace).to(x_BD.dtype)
        y_BKD = self.slot_outputs(x_BD, plan, k).view(num_tokens, k, d_model)
        # NOTE: a grouped plan's tensors take fresh memory (the workspace reads storage reference
        # counts on the host, which torch.compile cannot trace; on a GPU the caching allocator
        # reuses memory anyway)
        workspace = None if plan.grouped else self.workspace
        y_BD = _Combine.apply(y_BKD, gate_BK, workspace)
        return y_BD.to(x_BD.dtype)


class _Combine(torch.autograd.Function):
    """y_b = Σ_j gate_bj · y_bj in y's dtype: the broadcast product summed over k, as autograd
    would compute it (bit for bit, tests/test_workspace.py), but into the bank's workspace instead
    of fresh memory (0.35 ms at B = 4096, D = 64, k = 4, against 2.0 ms). Elementwise, as the
    paper's ops count has it."""

    @staticmethod
    def forward(ctx, y_BKD: Tensor, gate_BK: Tensor, workspace: Workspace | None) -> Tensor:
        num_tokens, _, d_model = y_BKD.shape
        gate_BK1 = gate_BK.to(y_BKD.dtype)[:, :, None]
        ctx.save_for_backward(y_BKD, gate_BK1)
        ctx.workspace, ctx.gate_dtype = workspace, gate_BK.dtype
        prod = torch.mul(y_BKD, gate_BK1, out=empty(workspace, y_BKD.shape, y_BKD))
        return torch.sum(prod, 1, out=empty(workspace, (num_tokens, d_model), y_BKD))

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        y_BKD, gate_BK1 = ctx.saved_tensors
        g_B1D = g_BD.to(y_BKD.dtype)[:, None, :]
        g_y = g_gate = None
        if ctx.needs_input_grad[0]:
            g_y = empty(ctx.workspace, y_BKD.shape, y_BKD)
            torch.mul(g_B1D, gate_BK1, out=g_y)
        if ctx.needs_input_grad[1]:
            prod = empty(ctx.workspace, y_BKD.shape, y_BKD)
            g_gate = torch.mul(g_B1D, y_BKD, out=prod).sum(-1).to(ctx.gate_dtype)
        return g_y, g_gate, None
