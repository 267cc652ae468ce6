"""Plain per-token loop implementations of the paper's MoE, written straight from the equations.

The tests compare the vectorised layers against these. Everything here is deliberately naive:
one token at a time, the load estimator through its definition kth_excluding(H(x), k, i) (paper
Eq. 9), the hierarchical load through Eq. 14 with explicit sets X^(i). Noise comes in as explicit
tensors, drawn by the test in the order the layers document.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def phi(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def kth_excluding(v: Tensor, k: int, i: int) -> Tensor:
    others = torch.cat([v[:i], v[i + 1 :]])
    return torch.sort(others, descending=True).values[k - 1]


def cv2(v: Tensor) -> Tensor:
    v = v.flatten()
    mean = v.sum() / v.numel()
    var = ((v - mean) ** 2).sum() / v.numel()
    return var / (mean**2 + 1e-10)


def gate_one(x: Tensor, w_gate: Tensor, w_noise: Tensor, k: int, eps: Tensor | None):
    """One token's gate: (selected experts, their gates, P(x, i) for all i or None)."""
    clean = x @ w_gate
    n = clean.numel()
    noisy = eps is not None and n > 1
    std = F.softplus(x @ w_noise) + 1e-2 if noisy else None
    h = clean + eps * std if noisy else clean
    idx = [int(i) for i in torch.sort(h, descending=True).indices[:k]]
    gates = torch.softmax(torch.stack([h[i] for i in idx]), dim=0)
    prob = None
    if noisy and k < n:
        prob = torch.stack([phi((clean[i] - kth_excluding(h, k, i)) / std[i]) for i in range(n)])
    return idx, gates, prob


def expert(x: Tensor, w_in: Tensor, w_out: Tensor, e: int) -> Tensor:
    return torch.relu(x @ w_in[e]) @ w_out[e]


def flat_moe(x_BD, w_gate, w_noise, w_in, w_out, k, eps_BE, w_importance, w_load):
    """Returns (y_BD, aux_loss, counts_E) for the flat layer (paper Eq. 1-10)."""
    num_experts = w_gate.shape[1]
    ys, importance = [], x_BD.new_zeros(num_experts)
    counts, load = x_BD.new_zeros(num_experts), x_BD.new_zeros(num_experts)
    smooth = False
    for b in range(x_BD.shape[0]):
        eps = None if eps_BE is None else eps_BE[b]
        idx, gates, prob = gate_one(x_BD[b], w_gate, w_noise, k, eps)
        y = x_BD.new_zeros(x_BD.shape[1])
        for e, g in zip(idx, gates, strict=True):
            y = y + g * expert(x_BD[b], w_in, w_out, e)
            importance = importance + F.one_hot(torch.tensor(e), num_experts) * g
            counts[e] += 1
        if prob is not None:
            smooth = True
            load = load + prob
        ys.append(y)
    load = load if smooth else counts
    aux = w_importance * cv2(importance) + w_load * cv2(load)
    return torch.stack(ys), aux, counts


def hierarchical_moe(
    x_BD, gate1, noise1, gate2, noise2, w_in, w_out, k1, k2, eps1_BG, eps2_PS, w_imp, w_load
):
    """Returns (y_BD, aux_loss, counts_E) for the hierarchical layer (paper App. B, Eq. 12-14).

    eps2_PS row b·k1 + j is the secondary noise of token b's j-th selected group."""
    num_groups, _, group_size = gate2.shape
    n = num_groups * group_size
    ys = []
    importance, counts = x_BD.new_zeros(n), x_BD.new_zeros(n)
    p_load, p_count = x_BD.new_zeros(num_groups), x_BD.new_zeros(num_groups)
    s_load = x_BD.new_zeros(num_groups, group_size)
    primary_smooth = secondary_smooth = False
    for b in range(x_BD.shape[0]):
        x = x_BD[b]
        eps1 = None if eps1_BG is None else eps1_BG[b]
        groups, g1, prob1 = gate_one(x, gate1, noise1, k1, eps1)
        if prob1 is not None:
            primary_smooth = True
            p_load = p_load + prob1
        y = x_BD.new_zeros(x_BD.shape[1])
        for j, (i, gi) in enumerate(zip(groups, g1, strict=True)):
            p_count[i] += 1
            eps2 = None if eps2_PS is None else eps2_PS[b * k1 + j]
            experts, g2, prob2 = gate_one(x, gate2[i], noise2[i], k2, eps2)
            if prob2 is not None:
                secondary_smooth = True
                s_load[i] = s_load[i] + prob2
            for e, gj in zip(experts, g2, strict=True):
                flat = i * group_size + e
                y = y + gi * gj * expert(x, w_in, w_out, flat)
                importance = importance + F.one_hot(torch.tensor(flat), n) * gi * gj
                counts[flat] += 1
        ys.append(y)
    if not primary_smooth:
        p_load = p_count
    if not secondary_smooth:
        s_load = counts.view(num_groups, group_size)
    load = s_load * (p_load / (p_count + 1e-10))[:, None]
    aux = w_imp * cv2(importance) + w_load * cv2(load)
    return torch.stack(ys), aux, counts
