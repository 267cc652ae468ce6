"""The sparsely-gated MoE layer (arXiv 1701.06538, §2-§4): pure math, no I/O.

gating (noisy top-k, Eq. 3-5) -> dispatch (who goes where) -> experts (the FFN bank, kernels in
expert_mlp) -> flat (`MoE`, Eq. 1) and hierarchical (`HierarchicalMoE`, Eq. 12-14), with the
balancing losses (Eq. 6-11, App. A) in balancing. Nothing here imports another moe_impl package.
"""
