"""The noisy top-k gate and its smooth load estimator (paper Eq. 3-5 and 8-9) as one autograd
Function with a hand-written backward: the same values as composing them from torch ops
(gating.noisy_top_k with `fused=False`, the reference the tests compare against), in fewer passes
over the tokens x experts tensors and with fewer of them alive.

    std = Softplus(x W_noise) + ε,   H = x W_g + N(0, 1)·std,   G = Softmax(top-k of H)
    P(x, i) = Φ((x W_g)_i − threshold_i) / std_i),   threshold_i = the (k+1)-th largest H when i is
    in the top k, else the k-th largest (tensor2tensor's _prob_in_top_k)

Why: autograd through that composition records ~15 elementwise ops on (tokens, experts) tensors,
each allocating a fresh result (and a fresh gradient in the backward); at 32 experts and 4096 tokens
those are 512 KB each, which glibc maps and unmaps afresh every step (docs/performance.md).

Backward, with z = (clean − threshold) / std and φ the standard normal density:
    ∂P/∂clean = φ(z)/std,  ∂P/∂threshold = −φ(z)/std,  ∂P/∂std = −z·φ(z)/std,
the threshold's gradient goes to the logit that is the (k+1)-th (for experts in the top k) or k-th
(for the others) largest, the softmax's to the k selected logits, and H's to clean (1) and std
(the noise sample); std's to W_noise's logits through Softplus' (torch's softplus_backward).

Shape suffixes: B = rows, E = experts (outputs of one gating network), K = k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _NoisyTopKWithLoad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, clean_BE, noise_logits_BE, normal_BE, k, noise_epsilon):
        std_BE = F.softplus(noise_logits_BE).add_(noise_epsilon)
        logits_BE = clean_BE + normal_BE * std_BE
        top_vals_BK, top_idx_BK = logits_BE.topk(k + 1, dim=-1)
        gates_BK = top_vals_BK[:, :k].softmax(dim=-1)
        threshold_in_B1 = top_vals_BK[:, k : k + 1]
        is_in_BE = logits_BE > threshold_in_B1
        del logits_BE
        threshold_BE = torch.where(is_in_BE, threshold_in_B1, top_vals_BK[:, k - 1 : k])
        z_BE = threshold_BE.neg_().add_(clean_BE).div_(std_BE)  # (clean - threshold) / std
        prob_BE = torch.special.ndtr(z_BE)
        ctx.save_for_backward(
            noise_logits_BE, normal_BE, std_BE, top_idx_BK, gates_BK, is_in_BE, z_BE
        )
        ctx.k = k
        ctx.mark_non_differentiable(top_idx_BK)
        return top_idx_BK[:, :k], gates_BK, prob_BE

    @staticmethod
    def backward(ctx, _g_idx, g_gates_BK, g_prob_BE):
        noise_logits_BE, normal_BE, std_BE, top_idx_BK, gates_BK, is_in_BE, z_BE = ctx.saved_tensors
        k = ctx.k
        g_top_BK = z_BE.new_zeros(top_idx_BK.shape)
        if g_prob_BE is not None:  # P's path: ∂P/∂clean = φ(z)/std, ∂P/∂threshold = -∂P/∂clean
            g_clean_BE = z_BE.square().mul_(-0.5).exp_().mul_(_INV_SQRT_2PI)
            g_clean_BE.mul_(g_prob_BE).div_(std_BE)
            g_threshold_BE = g_clean_BE.neg()
            g_std_BE = g_threshold_BE * z_BE  # ∂P/∂std = -z·φ(z)/std
            # the thresholds: the (k+1)-th logit for experts in the top k, the k-th for the others
            g_in_B = (g_threshold_BE * is_in_BE).sum(1)
            g_top_BK[:, k] = g_in_B
            g_top_BK[:, k - 1] = g_threshold_BE.sum(1) - g_in_B
        else:
            g_clean_BE, g_std_BE = torch.zeros_like(z_BE), torch.zeros_like(z_BE)
        if g_gates_BK is not None:  # the softmax over the k kept logits
            dot_B1 = (g_gates_BK * gates_BK).sum(-1, keepdim=True)
            g_top_BK[:, :k] += gates_BK * (g_gates_BK - dot_B1)
        g_logits_BE = torch.zeros_like(z_BE).scatter_(1, top_idx_BK, g_top_BK)
        # H = clean + noise·std
        g_clean_BE += g_logits_BE
        g_std_BE.addcmul_(g_logits_BE, normal_BE)
        g_noise_BE = torch.ops.aten.softplus_backward(g_std_BE, noise_logits_BE, 1.0, 20.0)
        return g_clean_BE, g_noise_BE, None, None, None


def noisy_top_k_with_load(
    clean_BE: Tensor, noise_logits_BE: Tensor, normal_BE: Tensor, k: int, noise_epsilon: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k indices, their gates, P(x, i)) of noisy gating with 1 <= k < E, for 2-D logits
    (rows, experts); `normal_BE` is the standard-normal noise sample."""
    return _NoisyTopKWithLoad.apply(clean_BE, noise_logits_BE, normal_BE, k, noise_epsilon)
