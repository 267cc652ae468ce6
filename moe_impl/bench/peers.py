"""The other MoE layers `python -m moe_impl bench --peers` times beside ours, in the same process as
their own FLOP-matched dense FFN, at the same d_model, expert hidden size and tokens.

Each peer gets the configuration closest to ours that it offers (`Peer.describe` says which, and
the row carries it as `peer_config`):

- `mixture-of-experts` (PyPI; lucidrains, "the most used port of this paper"): top-2 only, its
  "random" second-expert policy, capacity factor 1.25 (its defaults), ReLU experts without biases;
  `N-h` entries use its two-level `HeirarchicalMoE(dim, (a, b))`. Its dense baseline has k = 2.
- `st-moe-pytorch` (PyPI; lucidrains, ST-MoE): top-k with our k (4, or 2 + 2 = 4 for `N-h`: it has
  no hierarchy), second-expert thresholds 1e-9 so that every token goes to its k experts, as ours,
  and capacity factor 1.25·k (its 1.25 per token, counted per slot), our expert shape (ReLU, no
  biases) passed as its `experts`.
- `torchtitan` (where installed; its dependencies are heavy, so not in the `peers` extra): its
  `MoE` layer with softmax token-choice top-k, dropless, the for-loop experts on CPU.
- `megablocks` (CUDA only, where installed): dMoE, top-k, dropless grouped GEMM.

Both lucidrains layers take (batch, group, d) inputs and route within a group: groups of
GROUP_TOKENS tokens (the tokens of the step when fewer). Every layer's forward returns (y, aux loss, routing stats or None); the bench
step adds the aux loss to the loss as for ours. A peer that is not installed, or cannot run on the
device, is named with the reason instead (`unavailable`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_impl.bench.spec import K_PRIMARY, K_SECONDARY, OURS, ExpertSpec
from moe_impl.layer.flat import MoE, RoutingStats
from moe_impl.layer.hierarchical import HierarchicalMoE

GROUP_TOKENS = 1024  # the lucidrains layers' group (sequence) length


class Built(NamedTuple):
    module: nn.Module
    # x (T, d) -> (y (T, d), aux loss, RoutingStats for ours, None for a peer)
    forward: Callable[[Tensor], tuple[Tensor, Tensor, object]]
    k: int  # experts per token, for the FLOP-matched dense FFN


class Peer(NamedTuple):
    name: str  # the row's `implementation`
    module: str  # the import that must succeed
    install: str  # how to install it
    cuda_only: bool
    k: Callable[[ExpertSpec, int], int]  # (spec, our k) -> the experts per token it uses
    describe: Callable[[ExpertSpec, int], str]  # (spec, our k) -> its configuration, in words
    build: Callable[[ExpertSpec, int, int, int], Built]  # (spec, d, h, our k)


def relu_expert(d_model: int, d_hidden: int) -> nn.Module:
    """Our expert's shape: d -> h -> d, ReLU, no biases (moe_impl/layer/experts.py)."""
    return nn.Sequential(
        nn.Linear(d_model, d_hidden, bias=False),
        nn.ReLU(),
        nn.Linear(d_hidden, d_model, bias=False),
    )


def grouped(x_TD: Tensor) -> Tensor:
    """(T, d) -> (T / G, G, d), G = min(GROUP_TOKENS, T); T must be a multiple of G."""
    tokens = x_TD.shape[0]
    group = min(GROUP_TOKENS, tokens)
    if tokens % group:
        raise ValueError(
            f"--tokens={tokens} must be a multiple of {group} for the lucidrains peers"
        )
    return x_TD.view(tokens // group, group, x_TD.shape[1])


def k_of(spec: ExpertSpec, k: int) -> int:
    return K_PRIMARY * K_SECONDARY if spec.hierarchical else k


# --- mixture-of-experts (lucidrains) ---


def _lucidrains_describe(spec: ExpertSpec, k: int) -> str:
    shape = f"HeirarchicalMoE {spec.num_groups}x{spec.group_size}" if spec.hierarchical else "MoE"
    return f"{shape}, top-2 (its only k), capacity factor 1.25, groups of {GROUP_TOKENS} tokens"


def _lucidrains_build(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> Built:
    import mixture_of_experts as lm

    if spec.hierarchical:
        shape = (spec.num_groups, spec.group_size)
        module = lm.HeirarchicalMoE(d_model, shape, hidden_dim=d_hidden, activation=nn.ReLU)
    else:
        module = lm.MoE(d_model, spec.num_experts, hidden_dim=d_hidden, activation=nn.ReLU)

    def forward(x_TD: Tensor) -> tuple[Tensor, Tensor, None]:
        y, aux = module(grouped(x_TD))
        return y.reshape(x_TD.shape), aux, None

    return Built(module, forward, 2)


# --- st-moe-pytorch (lucidrains) ---


def _st_describe(spec: ExpertSpec, k: int) -> str:
    k = k_of(spec, k)
    flat = ", flat (no hierarchy)" if spec.hierarchical else ""
    return (
        f"MoE top-{k}{flat}, thresholds 1e-9 (every token to k experts), capacity factor "
        f"{1.25 * k:g}, ReLU experts without biases, groups of {GROUP_TOKENS} tokens"
    )


def _st_build(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> Built:
    import st_moe_pytorch

    k = k_of(spec, k)
    experts = nn.ModuleList(relu_expert(d_model, d_hidden) for _ in range(spec.num_experts))
    module = st_moe_pytorch.MoE(
        d_model,
        num_experts=spec.num_experts,
        gating_top_n=k,
        threshold_train=(1e-9,) * (k - 1),
        threshold_eval=(1e-9,) * (k - 1),
        capacity_factor_train=1.25 * k,
        capacity_factor_eval=1.25 * k,
        experts=experts,
    )

    def forward(x_TD: Tensor) -> tuple[Tensor, Tensor, None]:
        out = module(grouped(x_TD))
        return out[0].reshape(x_TD.shape), out[1], None

    return Built(module, forward, k)


# --- torchtitan (pytorch) ---


def _titan_describe(spec: ExpertSpec, k: int) -> str:
    k = k_of(spec, k)
    flat = ", flat (no hierarchy)" if spec.hierarchical else ""
    return (
        f"MoE token-choice top-{k}{flat}, softmax scores, dropless, SwiGLU experts of hidden "
        "2h/3 rounded to a multiple of 8 (about our ReLU expert's FLOPs), torch._grouped_mm, no auxiliary loss"
    )


def _titan_build(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> Built:
    from torchtitan.models.common import moe as titan
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    k, n = k_of(spec, k), spec.num_experts
    hidden = max(8, 8 * round(2 * d_hidden / 3 / 8))  # torch._grouped_mm: 16-byte strides
    experts = titan.GroupedExperts.Config(dim=d_model, hidden_dim=hidden, num_experts=n)
    config = titan.MoE.Config(
        num_experts=n,
        routed_experts=titan.RoutedExperts.Config(
            inner_experts=experts,
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=n, top_k=k),
        ),
        router=titan.TokenChoiceTopKRouter.Config(
            num_experts=n,
            gate=Linear.Config(in_features=d_model, out_features=n),
            top_k=k,
            score_func="softmax",
        ),
        load_balance_coeff=None,
    )
    module = config.build()
    with torch.no_grad():
        for p in module.parameters():  # its weights start empty: our scale, d^-1/2
            p.normal_(0.0, d_model**-0.5)

    def forward(x_TD: Tensor) -> tuple[Tensor, Tensor, None]:
        y = module(x_TD.view(1, *x_TD.shape))
        return y.reshape(x_TD.shape), y.new_zeros(()), None

    return Built(module, forward, k)


# --- megablocks (databricks), CUDA only ---


def _mega_describe(spec: ExpertSpec, k: int) -> str:
    k = k_of(spec, k)
    flat = ", flat (no hierarchy)" if spec.hierarchical else ""
    return f"dMoE top-{k}{flat}, dropless grouped GEMM, ReLU MLP experts"


def _mega_build(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> Built:
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    k = k_of(spec, k)
    args = Arguments(
        hidden_size=d_model,
        ffn_hidden_size=d_hidden,
        moe_num_experts=spec.num_experts,
        moe_top_k=k,
        mlp_type="mlp",
        mlp_impl="grouped",
        bias=False,
        activation_fn=torch.nn.functional.relu,
        fp16=False,
        bf16=False,
        device=torch.cuda.current_device(),
    )
    module = dMoE(args)

    def forward(x_TD: Tensor) -> tuple[Tensor, Tensor, None]:
        out = module(x_TD.view(x_TD.shape[0], 1, x_TD.shape[1]))
        y = out[0] if isinstance(out, tuple) else out
        return y.reshape(x_TD.shape), x_TD.new_zeros(()), None

    return Built(module, forward, k)


PEERS = {
    p.name: p
    for p in (
        Peer(
            "mixture-of-experts",
            "mixture_of_experts",
            "pip install -e .[peers]",
            False,
            lambda spec, k: 2,
            _lucidrains_describe,
            _lucidrains_build,
        ),
        Peer(
            "st-moe-pytorch",
            "st_moe_pytorch",
            "pip install -e .[peers]",
            False,
            k_of,
            _st_describe,
            _st_build,
        ),
        Peer(
            "torchtitan",
            "torchtitan",
            "pip install torchtitan (heavy; not in the extra)",
            False,
            k_of,
            _titan_describe,
            _titan_build,
        ),
        Peer(
            "megablocks",
            "megablocks",
            "pip install megablocks (CUDA)",
            True,
            k_of,
            _mega_describe,
            _mega_build,
        ),
    )
}


def unavailable(name: str, device: str) -> str | None:
    """Why peer `name` cannot run on `device` here, or None."""
    peer = PEERS[name]
    if peer.cuda_only and device != "cuda":
        return "CUDA only"
    if importlib.util.find_spec(peer.module) is None:
        return f"not installed ({peer.install})"
    return None


def parse_peers(text: str | None) -> list[str]:
    """`--peers` as given: None (not asked), "all", or names separated by commas."""
    if text is None:
        return []
    if text == "all":
        return list(PEERS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in PEERS:
            raise ValueError(f"--peers: unknown peer {name!r}; choose from all, {', '.join(PEERS)}")
    return names


def build_moe(spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> nn.Module:
    """Our layer for a `--experts` entry: HierarchicalMoE (k = 2 + 2) or MoE with k."""
    config = spec.layer_config(d_model, d_hidden, k)
    return (HierarchicalMoE if config.hierarchical else MoE)(config)


def build(name: str, spec: ExpertSpec, d_model: int, d_hidden: int, k: int) -> Built:
    """The layer of `name` (OURS or a peer) for `spec`, with its forward and the k it uses."""
    if name == OURS:
        k = k_of(spec, k)
        module = build_moe(spec, d_model, d_hidden, k)

        def forward(x_TD: Tensor) -> tuple[Tensor, Tensor, RoutingStats]:
            out = module(x_TD)
            return out.y, out.aux_loss, out.stats

        return Built(module, forward, k)
    return PEERS[name].build(spec, d_model, d_hidden, k)
