"""The hand-written backward of the block expert matmuls against plain autograd."""

from __future__ import annotations

import pytest
import torch

from moe_impl.layer.expert_mlp import block_expert_mlp

# (block_expert_L or None for in place, active experts) over 6 experts
LAYOUTS = [
    (torch.tensor([0, 0, 2, 5, 5, 5]), torch.tensor([0, 2, 5])),  # gathered, repeated experts
    (torch.tensor([1, 3, 4]), torch.tensor([1, 3, 4])),  # gathered, one block each
    (None, torch.tensor([0, 1, 3, 4, 5])),  # in place, expert 2 inactive
    (None, torch.arange(6)),  # in place, all active
]


@pytest.mark.parametrize(("blocks", "active"), LAYOUTS)
@pytest.mark.parametrize("sparse", [False, True])
def test_block_expert_mlp_matches_autograd(blocks, active, sparse):
    g = torch.Generator().manual_seed(0)
    num_blocks = 6 if blocks is None else blocks.numel()
    w_in = torch.randn(6, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w_out = torch.randn(6, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(num_blocks, 3, 4, dtype=torch.float64, generator=g)
    if blocks is None:  # the inactive experts' blocks hold only (zero-weighted) padding
        x[[e for e in range(6) if e not in active.tolist()]] = 0.0
    x.requires_grad_(True)
    r = torch.randn(num_blocks, 3, 4, dtype=torch.float64, generator=g)

    counts = torch.zeros(6, dtype=torch.long).index_fill_(0, active, 1)
    y = block_expert_mlp(x, w_in, w_out, blocks, counts, sparse_grad=sparse)
    got = torch.autograd.grad((y * r).sum(), [x, w_in, w_out])
    idx = torch.arange(6) if blocks is None else blocks
    want_y = torch.bmm(torch.relu(torch.bmm(x, w_in[idx])), w_out[idx])
    want = torch.autograd.grad((want_y * r).sum(), [x, w_in, w_out])

    torch.testing.assert_close(y, want_y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b)
    if sparse:
        assert got[1].is_sparse and got[1].is_coalesced()
        assert torch.equal(got[1].indices()[0], active)
