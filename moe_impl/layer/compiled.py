"""Routing and combine through `torch.compile` (issue 29, item 3): the gate's elementwise chain
(noise, top-k, softmax over the k kept logits, the load estimator's normal CDF; paper Eq. 3-5, 8-9)
and the combine y_b = Σ_j G(x_b)_j · E_j(x_b) (Eq. 1: gather, scale, sum over k) as compiled pure
functions of tensors, while the gate matmuls, the dispatch and the expert matmuls stay eager.

`compile_routing(layer, **compile_kwargs)` (also `MoELayer.compile_routing`) switches every gating
network and expert bank inside `layer` to these functions; the eager path is untouched otherwise.
The compiled regions take no generator and read nothing back from the device: the gate noise is
drawn eagerly, exactly as the eager gate draws it (same shape, generator and dtype, so one seed
routes both paths alike), and passed in as a tensor; every branch depends only on shapes, k and
whether noise applies. They are compiled with fullgraph=True, so a graph break is an error.

Values: equal to the eager path within float32 rounding (tests/test_compiled.py), not bit for bit:
the compiled gate is the composition of torch ops (gating.noisy_top_k with fused=False), which
the eager path's fused Function (fused_gate.py) is held to, and the compiler may reorder sums.

Shape suffixes: B = tokens (or pairs), E = experts of one gating network, K = k, D = d_model,
N = B·K slots, R = rows of the experts' buffer (padding included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moe_impl.layer.experts import ExpertBank
from moe_impl.layer.gating import GateOutput, GatingNetwork, Noise, noisy_top_k, standard_normal

# the defaults of `compile_routing`: whole graphs only (a break raises), shapes made dynamic by
# torch's own rule (after the first recompile)
DEFAULTS: dict[str, Any] = {"fullgraph": True}


def gate_math(
    clean_BE: Tensor,
    noise_logits_BE: Tensor | None,
    normal_BE: Tensor | None,
    k: int,
    noise_epsilon: float,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(top-k indices, gates, P(x, i) or None) of noisy top-k gating given the noise sample
    `normal_BE` (None without noise): gating.noisy_top_k composed from torch ops."""
    out = noisy_top_k(
        clean_BE, noise_logits_BE, k, noise_epsilon=noise_epsilon, normal_BE=normal_BE, fused=False
    )
    return out.top_idx_BK, out.top_gates_BK, out.prob_in_top_k_BE


def _rows_or_zero(values_RD: Tensor, row_N: Tensor) -> Tensor:
    """values_RD[row_N], a zero row where row_N == R (a dropped slot, dispatch.from_rows)."""
    num_rows = values_RD.shape[0]
    rows_ND = values_RD.index_select(0, row_N.clamp(max=num_rows - 1))
    return torch.where((row_N < num_rows)[:, None], rows_ND, 0)


def combine_forward(values_RD: Tensor, row_of_slot_N: Tensor, gate_BK: Tensor) -> Tensor:
    """y_b = Σ_j gate_bj · values[row of slot b·k+j], in values' dtype (experts._Combine after
    dispatch.from_rows)."""
    num_tokens, k = gate_BK.shape
    rows_BKD = _rows_or_zero(values_RD, row_of_slot_N).view(num_tokens, k, -1)
    return (rows_BKD * gate_BK.to(values_RD.dtype)[:, :, None]).sum(1)


def combine_backward(
    g_BD: Tensor,
    values_RD: Tensor,
    row_of_slot_N: Tensor,
    slot_of_row_R: Tensor,
    gate_BK: Tensor,
) -> tuple[Tensor, Tensor]:
    """The gradients of combine_forward for values and gates, both as gathers: row r holds slot
    n = slot_of_row_R[r] of token n // k (n = N for padding, whose gradient is 0), so its
    gradient is g_token · gate_n; the gate's is <g_token, its row>."""
    num_tokens, k = gate_BK.shape
    num_slots = num_tokens * k
    g_BD = g_BD.to(values_RD.dtype)
    rows_BKD = _rows_or_zero(values_RD, row_of_slot_N).view(num_tokens, k, -1)
    g_gate_BK = (g_BD[:, None, :] * rows_BKD).sum(-1).to(gate_BK.dtype)
    slot_R = slot_of_row_R.clamp(max=num_slots - 1)
    gate_R = gate_BK.reshape(-1).to(values_RD.dtype).index_select(0, slot_R)
    g_rows_RD = g_BD.index_select(0, slot_R // k) * gate_R[:, None]
    g_values_RD = torch.where((slot_of_row_R < num_slots)[:, None], g_rows_RD, 0)
    return g_values_RD, g_gate_BK


class CompiledRouting(NamedTuple):
    """The compiled functions one `compile_routing` call installs, and the kwargs they took."""

    gate: Callable[..., tuple[Tensor, Tensor, Tensor | None]]
    combine_forward: Callable[..., Tensor]
    combine_backward: Callable[..., tuple[Tensor, Tensor]]
    compile_kwargs: dict[str, Any]

    def select(
        self,
        clean_BE: Tensor,
        noise_BE: Tensor | None,
        network: GatingNetwork,
        generator: Noise = None,
        normal_BE: Tensor | None = None,
    ) -> GateOutput:
        """GatingNetwork.select through the compiled gate: the noise drawn here, as noisy_top_k
        draws it, where noise applies (noise logits given and more than one expert)."""
        if noise_BE is None or clean_BE.shape[-1] == 1:
            noise_BE = normal_BE = None
        elif normal_BE is None:
            normal_BE = standard_normal(clean_BE.shape, generator, clean_BE)
        return GateOutput(
            *self.gate(clean_BE, noise_BE, normal_BE, network.k, network.noise_epsilon)
        )

    def combine(
        self, values_RD: Tensor, gate_BK: Tensor, row_of_slot_N: Tensor, slot_of_row_R: Tensor
    ) -> Tensor:
        """experts._Combine of dispatch.from_rows(values_RD), through the compiled functions."""
        return _CompiledCombine.apply(values_RD, gate_BK, row_of_slot_N, slot_of_row_R, self)


class _CompiledCombine(torch.autograd.Function):
    """combine_forward with combine_backward as its backward (each one compiled graph): autograd
    of the gather would scatter-add into the rows, where the inverse map lets the backward gather."""

    @staticmethod
    def forward(ctx, values_RD, gate_BK, row_of_slot_N, slot_of_row_R, routing):
        ctx.save_for_backward(values_RD, gate_BK, row_of_slot_N, slot_of_row_R)
        ctx.routing = routing
        return routing.combine_forward(values_RD, row_of_slot_N, gate_BK)

    @staticmethod
    def backward(ctx, g_BD):
        values_RD, gate_BK, row_of_slot_N, slot_of_row_R = ctx.saved_tensors
        g_values_RD, g_gate_BK = ctx.routing.combine_backward(
            g_BD.contiguous(), values_RD, row_of_slot_N, slot_of_row_R, gate_BK
        )
        return g_values_RD, g_gate_BK, None, None, None


@functools.cache
def _compiled(items: tuple[tuple[str, Any], ...]) -> CompiledRouting:
    """One set of compiled functions per distinct kwargs, shared by every layer that asks for
    them (one compile cache, so layers of one shape compile once)."""
    kwargs = dict(items)
    return CompiledRouting(
        torch.compile(gate_math, **kwargs),
        torch.compile(combine_forward, **kwargs),
        torch.compile(combine_backward, **kwargs),
        kwargs,
    )


def routing_functions(**compile_kwargs: Any) -> CompiledRouting:
    """The compiled functions for `torch.compile(**compile_kwargs)` over DEFAULTS."""
    kwargs = {**DEFAULTS, **compile_kwargs}
    try:
        return _compiled(tuple(sorted(kwargs.items())))
    except TypeError:  # an unhashable value (an options dict): compiled for this call alone
        return _compiled.__wrapped__(tuple(sorted(kwargs.items())))


def set_routing(module: nn.Module, routing: CompiledRouting | None) -> int:
    """Route every gating network and combine every expert bank inside `module` through
    `routing`'s compiled functions, or through the eager path again with None; returns how many
    submodules it set."""
    switched = 0
    for sub in module.modules():
        if isinstance(sub, GatingNetwork | ExpertBank):
            sub.compiled = routing
            switched += 1
    return switched


def compile_routing(module: nn.Module, **compile_kwargs: Any) -> int:
    """`set_routing(module, routing_functions(**compile_kwargs))`."""
    return set_routing(module, routing_functions(**compile_kwargs))
