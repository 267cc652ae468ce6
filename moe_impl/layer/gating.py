"""Noisy top-k gating (Shazeer et al. 2017, Sec. 2.1, Eq. 3-5) with tensor2tensor's details.

    G(x) = Softmax(KeepTopK(H(x), k)),   H(x)_i = (x W_g)_i + N(0, 1) · (Softplus((x W_noise)_i) + ε)

Paper symbols: W_g -> w_gate, W_noise -> w_noise, H(x) -> noisy logits, P(x, i) -> prob_in_top_k.
The gates stay sparse: each row keeps k (index, value) pairs, never a dense tokens x experts matrix.
Loss terms live in balancing.py; token movement in dispatch.py.

Shape suffixes: B = rows, D = d_model, E = experts (outputs of one gating network), K = k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_impl.layer.balancing import prob_in_top_k_from_top
from moe_impl.layer.fused_gate import noisy_top_k_with_load
from moe_impl.layer.gate_precision import effective_precision, low_precision_gate_matmul

if TYPE_CHECKING:
    from moe_impl.layer.compiled import CompiledRouting

# tensor2tensor adds 1e-2 to the softplus (noisy_top_k_gating, tensor2tensor/utils/expert_utils.py)
# so the load estimator never divides by 0.
NOISE_EPSILON = 1e-2


class NoiseSource(Protocol):
    """Supplies the gates' standard-normal noise itself: called with the shape of the draw and a
    tensor whose device and dtype it must have (e.g. gpucheck/exactness.py draws both sides of a
    comparison from one float64 stream, so that two devices route alike)."""

    def __call__(self, shape: tuple[int, ...], like: Tensor) -> Tensor: ...


# what a layer's `generator` argument may be: torch's generator (None: its default one) or a source
Noise = torch.Generator | NoiseSource | None


def standard_normal(shape: Sequence[int], generator: Noise, like: Tensor) -> Tensor:
    """N(0, 1) samples of `shape` on like's device, in like's dtype: torch.randn from `generator`,
    or whatever a NoiseSource returns for them."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)
    return generator(tuple(shape), like)


class GateOutput(NamedTuple):
    top_idx_BK: Tensor  # selected experts, in descending order of noisy logit
    top_gates_BK: Tensor  # softmax over the k kept noisy logits; each row sums to 1
    prob_in_top_k_BE: Tensor | None  # P(x, i) of Eq. 9 where the smooth load applies, else None


def noisy_top_k(
    clean_BE: Tensor,
    noise_logits_BE: Tensor | None,
    k: int,
    *,
    noise_epsilon: float = NOISE_EPSILON,
    generator: Noise = None,
    normal_BE: Tensor | None = None,
    fused: bool = True,
) -> GateOutput:
    """Noisy top-k gating given the clean logits x W_g and, when noise is on, x W_noise.

    `noise_logits_BE=None` means no noise (evaluation, or `noisy_gating=False`): routing is then the
    deterministic top-k of the clean logits and the load is the true count. With k >= E every expert
    is selected and the gates are the softmax over all (noisy) logits. With a single expert the noise
    cannot change anything, so none is drawn. `normal_BE`, standard-normal samples of the logits'
    shape, replaces the draw from `generator` (the expert-parallel layers pass their rows of a
    draw made for the whole global batch, moe_impl/parallel). With noise and k < E the gate and
    its load estimator run as one Function (fused_gate.py); `fused=False` composes them from torch
    ops instead (the reference the tests hold the Function to).
    """
    num_experts = clean_BE.shape[-1]
    noisy = noise_logits_BE is not None and num_experts > 1
    if noisy:
        assert noise_logits_BE is not None  # for mypy: `noisy` says so
        eps_BE = normal_BE
        if eps_BE is None:
            eps_BE = standard_normal(clean_BE.shape, generator, clean_BE)
        if fused and k < num_experts:
            flat = (-1, num_experts)
            idx, gates, prob = noisy_top_k_with_load(
                clean_BE.reshape(flat),
                noise_logits_BE.reshape(flat),
                eps_BE.reshape(flat),
                k,
                noise_epsilon,
            )
            lead = clean_BE.shape[:-1]
            return GateOutput(idx.view(*lead, k), gates.view(*lead, k), prob.view(clean_BE.shape))
        std_BE = F.softplus(noise_logits_BE) + noise_epsilon
        logits_BE = clean_BE + eps_BE * std_BE
    else:
        logits_BE = clean_BE
    # k+1 values: the (k+1)-th is the "in" threshold of the load estimator (Eq. 9; _prob_in_top_k
    # of tensor2tensor/utils/expert_utils.py).
    # NOTE: ties (e.g. all-zero logits in eval at init) resolve in torch.topk's order, not t2t's
    # lowest-index order; with noise or trained weights ties have probability zero.
    top_vals_BK, top_idx_BK = logits_BE.topk(min(k + 1, num_experts), dim=-1)
    gates_BK = top_vals_BK[..., :k].softmax(dim=-1)
    prob_BE = None
    if noisy and k < num_experts:
        prob_BE = prob_in_top_k_from_top(clean_BE, logits_BE, std_BE, top_vals_BK, k)
    return GateOutput(top_idx_BK[..., :k], gates_BK, prob_BE)


def gate_dtype(x: Tensor) -> torch.dtype:
    """The dtype the gates compute in: x's, but at least float32 (bf16 rounding must not flip
    which experts win)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def gate_matmul(x: Tensor, w: Tensor, precision: str = "float32") -> Tensor:
    """x @ w in at least float32 (gate_dtype), autocast off; `precision` (MoEConfig.gate_precision,
    gate_precision.py) says how the matmul rounds its operands. x is 2-D unless precision is
    float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = gate_dtype(x)
        if effective_precision(precision, x.device) == "float32":
            return torch.matmul(x.to(dtype), w.to(dtype))
        return low_precision_gate_matmul(x.to(dtype), w.to(dtype), precision)


class GatingNetwork(nn.Module):
    """W_g and W_noise of a gating network (paper Eq. 4) with its k, noise settings and the
    precision of its matmuls (`precision`, MoEConfig.gate_precision). Both start at zero (paper
    App. A): no signal and some noise, so routing starts uniformly at random. Subclasses compute
    the logits; `select` turns them into gates (Eq. 3-5)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        k: int,
        *,
        noisy_gating: bool = True,
        noise_epsilon: float = NOISE_EPSILON,
        precision: str = "float32",
    ) -> None:
        super().__init__()
        self.k = k
        self.noisy_gating = noisy_gating
        self.noise_epsilon = noise_epsilon
        self.precision = precision
        self.w_gate = nn.Parameter(torch.zeros(shape))
        self.w_noise = nn.Parameter(torch.zeros(shape))
        # the compiled gate (compiled.py; MoELayer.compile_routing), None for the eager one
        self.compiled: CompiledRouting | None = None

    def __getstate__(self) -> dict:
        """A pickled (torch.save, copy.deepcopy) network routes eagerly: torch.compile's wrappers
        do not pickle; compile_routing the copy again where wanted."""
        return {**self.__dict__, "compiled": None}

    @property
    def uses_noise(self) -> bool:
        # Noise only in training: tensor2tensor's noisy_top_k_gating multiplies the std by
        # float(train).
        return self.training and self.noisy_gating

    def select(
        self,
        clean_BE: Tensor,
        noise_BE: Tensor | None,
        generator: Noise = None,
        normal_BE: Tensor | None = None,
    ) -> GateOutput:
        """`noisy_top_k` with this network's k and noise epsilon (compiled where set)."""
        if self.compiled is not None:
            return self.compiled.select(clean_BE, noise_BE, self, generator, normal_BE)
        return noisy_top_k(
            clean_BE,
            noise_BE,
            self.k,
            noise_epsilon=self.noise_epsilon,
            generator=generator,
            normal_BE=normal_BE,
        )


class NoisyTopKGate(GatingNetwork):
    """One gating network over `num_experts` outputs: w_gate, w_noise of shape (d, E)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        noisy_gating: bool = True,
        noise_epsilon: float = NOISE_EPSILON,
        precision: str = "float32",
    ) -> None:
        super().__init__(
            (d_model, num_experts),
            k,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            precision=precision,
        )

    def forward(self, x_BD: Tensor, generator: Noise = None) -> GateOutput:
        return self.select(*self.logits(x_BD), generator=generator)

    def logits(self, x_BD: Tensor, precision: str | None = None) -> tuple[Tensor, Tensor | None]:
        """x W_g and, when noise applies, x W_noise (else None), at `precision` (None: the
        network's own)."""
        precision = precision or self.precision
        noise_BE = gate_matmul(x_BD, self.w_noise, precision) if self.uses_noise else None
        return gate_matmul(x_BD, self.w_gate, precision), noise_BE
