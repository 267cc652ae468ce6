"""The precision of the gate logits' matmuls, x W_g and x W_noise (paper Eq. 4) and the secondary
gates' of App. B: `MoEConfig.gate_precision`, a trade of routing exactness for speed that is not in
the paper.

- "float32" (the default): float32 operands and accumulation (float64 inputs stay float64); the
  routing is the float64 reference's. It does not turn TF32 off: where the process allows TF32
  for all float32 matmuls (torch.backends.cuda.matmul), the gate's run with it too.
- "tf32": on CUDA the matmuls, forward and backward, run with TF32 allowed (tensor cores: operands
  rounded to a 10-bit mantissa, float32 accumulation). CPUs have no TF32: there it is float32,
  bit for bit.
- "bf16": the operands rounded to bfloat16, their products accumulated in float32, the results
  float32; the backward's matmuls alike (the logits' gradient rounded to bf16 too, as autocast's
  matmuls round theirs), the weights' gradients float32. On CUDA one bf16 GEMM with a float32
  output; elsewhere emulated by rounding the operands to bf16 and multiplying them in the gate's
  dtype: the same numbers up to the order of summation, since the product of two bf16 values is
  exact in float32.

Only the matmuls change: noise, top-k, softmax and the load estimator stay in the gate's dtype.
Shape suffixes: B = rows, D = d_model, E = outputs of one gating network, L = blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from moe_impl.layer.workspace import Workspace, empty


@contextlib.contextmanager
def tf32_matmuls(device: torch.device) -> Iterator[None]:
    """CUDA float32 matmuls launched inside may use TF32; the previous setting is back after.

    NOTE: torch keeps this setting per process, not per thread: a matmul that another thread
    launches meanwhile may use TF32 too. The math mode is fixed when a kernel is launched, so
    kernels still queued when the scope ends keep it. Nothing changes off CUDA."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    if device.type != "cuda" or before == "tf32":  # no TF32 here, or allowed already
        yield
        return
    # torch refuses matmuls while its legacy and new precision settings disagree, so this sets
    # TF32 through the API the process used and restores exactly what was there
    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through the new API only
        legacy = None
    if legacy is None:
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True  # sets both, consistently
    try:
        yield
    finally:
        if legacy == "highest":  # TF32 off again, leaving the other backends' settings alone
            matmul.allow_tf32 = False
        elif legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision = before


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision a gate matmul on `device` runs at: "tf32" is "float32" off CUDA."""
    return "float32" if precision == "tf32" and device.type != "cuda" else precision


def round_to_bf16(t: Tensor) -> Tensor:
    """t rounded to the nearest bfloat16 (ties to even), in t's dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


def precision_matmul(
    a: Tensor, b: Tensor, precision: str, workspace: Workspace | None = None
) -> Tensor:
    """a @ b at `precision` (module docstring), 2-D or batched 3-D, the result in a's dtype (b's
    must match); a batched result goes into `workspace` memory where there is one."""
    batched = a.dim() == 3
    shape = (a.shape[0], a.shape[1], b.shape[2]) if batched else (a.shape[0], b.shape[1])
    if precision == "bf16":
        if a.is_cuda and a.dtype == torch.float32:  # one bf16 GEMM, float32 accumulate and out
            a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
            if batched:
                return torch.bmm(a16, b16, out_dtype=torch.float32, out=empty(workspace, shape, a))
            return torch.mm(a16, b16, out_dtype=torch.float32)
        a, b = round_to_bf16(a), round_to_bf16(b)
    scope = tf32_matmuls(a.device) if precision == "tf32" else contextlib.nullcontext()
    with scope:
        if batched:
            return torch.bmm(a, b, out=empty(workspace, shape, a))
        return torch.mm(a, b)


class _GateMatmul(torch.autograd.Function):
    """x_BD @ w_DE at a precision other than float32; the backward's two matmuls at the same
    precision (the float32 path is gating.gate_matmul's plain autograd)."""

    @staticmethod
    def forward(ctx, x_c, w_c, precision):
        ctx.save_for_backward(x_c, w_c)
        ctx.precision = precision
        return precision_matmul(x_c, w_c, precision)

    @staticmethod
    def backward(ctx, g_BE):
        x_c, w_c = ctx.saved_tensors
        g_BE = g_BE.to(x_c.dtype).contiguous()
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = precision_matmul(g_BE, w_c.t(), ctx.precision)
        if ctx.needs_input_grad[1]:
            g_w = precision_matmul(x_c.t(), g_BE, ctx.precision)
        return g_x, g_w, None


def low_precision_gate_matmul(x_c: Tensor, w_c: Tensor, precision: str) -> Tensor:
    """x_c @ w_c (2-D, both already in the gate's dtype) at `precision`, differentiable."""
    return _GateMatmul.apply(x_c, w_c, precision)
