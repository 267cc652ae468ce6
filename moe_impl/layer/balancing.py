"""Load-balancing losses of the sparsely-gated MoE (Shazeer et al. 2017, Sec. 4, App. A and B).

Pure tensor functions: the coefficient of variation, the smooth load estimator P(x, i) and the
importance / load vectors, flat and hierarchical. The layers (flat.py, hierarchical.py and their
expert-parallel twins in moe_impl/parallel) weight and sum them; nothing here keeps state. Semantics
follow `cv_squared` and `_prob_in_top_k` of tensor2tensor/utils/expert_utils.py.

Shape suffixes: B = rows (tokens, or token-group pairs), E = experts, N = routed slots, K = k,
G = groups (a), S = group size (b), P = (token, group) pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The one epsilon of the balancing maths: tensor2tensor's cv_squared and the hierarchical load's
# division by the true count both add 1e-10 (tensor2tensor/utils/expert_utils.py).
EPS = 1e-10


def cv_squared(v: Tensor) -> Tensor:
    """CV(v)² = population variance / (mean² + 1e-10), paper Eq. 7 and 10.

    As tensor2tensor's `cv_squared`: population (not sample) variance, and 0 for an empty tensor.
    The CV is taken over every entry of `v` (the hierarchical layer passes its a·b matrix).
    """
    v = v.flatten()
    if v.numel() == 0:
        return v.new_zeros(())
    mean = v.mean()
    return (v - mean).square().mean() / (mean.square() + EPS)


def prob_in_top_k(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """P(x, i) of paper Eq. 9: the probability that expert i stays in the top k when its noise is
    re-drawn and every other expert's noise is held fixed.

        P(x, i) = Φ(((x W_g)_i − kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i))

    `noise_std` is the full standard deviation (softplus + epsilon, as the gate uses it). Returns a
    tensor of the logits' shape. Needs 1 <= k < n: with k >= n every expert is always selected and the
    load is the true count (tensor2tensor does the same).
    """
    n = clean_logits.shape[-1]
    if not 1 <= k < n:
        raise ValueError(
            f"prob_in_top_k: k must satisfy 1 <= k < n={n} (number of experts), got {k}"
        )
    if not clean_logits.shape == noisy_logits.shape == noise_std.shape:
        raise ValueError(
            "prob_in_top_k: clean_logits, noisy_logits and noise_std must have one shape, got "
            f"{tuple(clean_logits.shape)}, {tuple(noisy_logits.shape)}, {tuple(noise_std.shape)}"
        )
    top_values = noisy_logits.topk(k + 1, dim=-1).values
    return prob_in_top_k_from_top(clean_logits, noisy_logits, noise_std, top_values, k)


def prob_in_top_k_from_top(
    clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, top_values: Tensor, k: int
) -> Tensor:
    """`prob_in_top_k` given the k+1 largest noisy logits, descending (the gate computes them anyway).

    kth_excluding(H, k, i) is the (k+1)-th largest value t_k when i is itself in the top k, and the
    k-th largest t_{k-1} otherwise (tensor2tensor's threshold_if_in / threshold_if_out). Gradients
    flow through the clean logits, the standard deviation and the thresholds, as in tensor2tensor.
    """
    threshold_in = top_values[..., k : k + 1]
    threshold_out = top_values[..., k - 1 : k]
    is_in = noisy_logits > threshold_in
    threshold = torch.where(is_in, threshold_in, threshold_out)
    return torch.special.ndtr((clean_logits - threshold) / noise_std)


def importance(expert_N: Tensor, gate_N: Tensor, num_experts: int) -> Tensor:
    """Importance(X)_e = Σ_x G(x)_e (paper Eq. 6), from the sparse (expert, gate) slots."""
    return gate_N.new_zeros(num_experts).index_add(0, expert_N, gate_N)


def load(prob_in_top_k_BE: Tensor | None, counts_E: Tensor) -> Tensor:
    """Load(X)_e = Σ_x P(x, e) (paper Eq. 10) where the gate gave the smooth estimator, else the
    true count `counts_E` (floating point), as tensor2tensor does without noise or with k >= n."""
    return counts_E if prob_in_top_k_BE is None else prob_in_top_k_BE.sum(0)


def group_load(prob_in_top_k_PS: Tensor | None, group_P: Tensor, counts_GS: Tensor) -> Tensor:
    """Load_i(X^(i))_j of paper Eq. 14 for every group i, (G, S): each secondary gate's smooth load
    summed over the pairs routed to its group (`group_P`), else the true counts `counts_GS`."""
    if prob_in_top_k_PS is None:
        return counts_GS
    return prob_in_top_k_PS.new_zeros(counts_GS.shape).index_add(0, group_P, prob_in_top_k_PS)


def hierarchical_load(
    secondary_load_GS: Tensor, primary_load_G: Tensor, primary_count_G: Tensor
) -> Tensor:
    """Load_H(X)_{i,j} = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)| (paper Eq. 14), flat (G·S,).

    |X^(i)| is the true count of pairs routed to group i, plus EPS as tensor2tensor adds (a group
    that got no pair has a secondary load of 0 anyway). The primary load carries the gradient to
    the primary gate that the secondary load alone would not.
    """
    scale_G = primary_load_G / (primary_count_G + EPS)
    return (secondary_load_GS * scale_G[:, None]).reshape(-1)
