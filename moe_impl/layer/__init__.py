"""The sparsely-gated MoE layer (arXiv 1701.06538, §2-§4): pure math, no I/O.

gating (noisy top-k, Eq. 3-5) -> dispatch (who goes where) -> experts (the FFN bank, kernels in
expert_mlp) -> flat (`MoE`, Eq. 1) and hierarchical (`HierarchicalMoE`, Eq. 12-14), with the
balancing losses (Eq. 6-11, 13-14, App. A) in balancing and the hyper-parameters of every layer,
validated once, in config (`MoEConfig`). Nothing here imports another moe_impl package.
"""
