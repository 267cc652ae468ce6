"""The peak memory of one `bench` configuration, estimated before its layer is built, so that the
parent skips a configuration that cannot fit instead of starting to allocate it (docs/performance.md).

What a training step of the bench holds at its peak, in float32 values (4 bytes; autocast's bf16
halves some activations, which the estimate ignores):

- parameters: the MoE layer's (experts E·2dh, gates) and the dense FFN's 2·d·k·h;
- gradients: the gates' and the dense FFN's; the experts' E·2dh when dense, A·2dh when sparse
  (E >= SPARSE_GRAD_MIN_EXPERTS; A = experts that received a token);
- the dispatch buffers: R = L·C rows (L blocks of C rows, dispatch.choose_block_size's layout for
  the routing of the bench, uniform at initialisation) times ROW_COPIES·(d + h) values, and in the
  gathered layout each block's copy of its expert's weights plus its weight gradient, 2·L·2dh;
- the gate: GATE_COPIES tensors of tokens x gate outputs (E flat: clean and noise logits, noise,
  softplus, P(x, i) of Eq. 9 and their gradients; a + 2b hierarchical);
- the input T·d and the process itself, BASE_MB (torch loaded). The dense FFN's activations are
  not added: its step alternates with the MoE's and holds less (the same T·k·h hidden values).

The coefficients were fitted on measured peaks (`peak_mem_mb`, ru_maxrss of the child, CPU,
d=64, h=128, k=4) and rounded up, so that the estimate lies at or above each of them, by 2-38 %
(tests/test_reliability_inputs.py holds the table; the expert bank's workspace, 2026-12-01, lowered
the peaks at large token counts, where the estimate is now the most conservative).
"""

from __future__ import annotations

import torch

from moe_impl.bench.spec import K_PRIMARY, K_SECONDARY, ExpertSpec, gate_outputs
from moe_impl.layer.config import SPARSE_GRAD_MIN_EXPERTS
from moe_impl.layer.dispatch import choose_block_size

BYTES = 4  # float32
BASE_MB = 280  # the child before its layers: the interpreter, torch and its libraries (CPU)
GATE_COPIES = 18
ROW_COPIES = 5


def routing(num_experts: int, slots: int, seed: int = 0) -> tuple[int, int, int, bool]:
    """(active experts A, blocks L, rows per block C, in place) of the dispatch of `slots` slots
    routed uniformly at random, as the bench's zero-initialised gates route (dispatch.make_plan)."""
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.bincount(
        torch.randint(num_experts, (slots,), generator=g), minlength=num_experts
    )
    block_size, in_place = choose_block_size(counts_E)
    blocks = num_experts if in_place else int(((counts_E + block_size - 1) // block_size).sum())
    return int((counts_E > 0).sum()), blocks, block_size, in_place


def estimate_terms(spec: ExpertSpec, d_model: int, d_hidden: int, k: int, tokens: int) -> dict:
    """The estimate's terms, in values (BYTES each), by what holds them (module docstring)."""
    d, h, n = d_model, d_hidden, spec.num_experts
    if spec.hierarchical:
        assert spec.num_groups is not None and spec.group_size is not None  # hierarchical: set
        k = K_PRIMARY * K_SECONDARY
        gate_params = 2 * d * (spec.num_groups + spec.num_groups * spec.group_size)
    else:
        gate_params = 2 * d * n
    expert = 2 * d * h  # one expert's weights
    active, blocks, block_size, in_place = routing(n, tokens * k)
    sparse = n >= SPARSE_GRAD_MIN_EXPERTS
    return {
        "params": n * expert + gate_params + 2 * d * k * h,
        "grads": (active if sparse else n) * expert + gate_params + 2 * d * k * h,
        "gathered_weights": 0 if in_place else 2 * blocks * expert,
        "dispatch_rows": ROW_COPIES * blocks * block_size * (d + h),
        "gate": GATE_COPIES * tokens * gate_outputs(spec),
        "input": tokens * d,
    }


def estimate_peak_bytes(spec: ExpertSpec, d_model: int, d_hidden: int, k: int, tokens: int) -> int:
    """The estimated peak memory of one bench configuration's training step, in bytes."""
    values = sum(estimate_terms(spec, d_model, d_hidden, k, tokens).values())
    return BASE_MB * 2**20 + BYTES * values
