"""What `bench` measures, torch-free (the workflow imports it at parse time): the `--experts`
entries and the analytic FLOPs of one training step (the formula is moe_impl/model/flops.py's)."""

from __future__ import annotations

import re
from typing import NamedTuple

from moe_impl.layer.config import DEFAULT_K_PRIMARY, DEFAULT_K_SECONDARY, MoEConfig
from moe_impl.model.flops import moe_layer_train_flops_per_token

# every hierarchical model of the paper uses 2 + 2 (MoEConfig's defaults)
K_PRIMARY, K_SECONDARY = DEFAULT_K_PRIMARY, DEFAULT_K_SECONDARY
# the peers' largest expert count (bench --peers-max-experts, the workflow's bench.peers_max_experts,
# whose schema default is this): their routing tensors grow with tokens x experts
PEERS_MAX_EXPERTS = 4096
OURS = "moe_impl"  # a bench row's `implementation` for this package's layer (others: peers.py)


class ExpertSpec(NamedTuple):
    """One `--experts` entry: flat (num_groups = group_size = None) or hierarchical a x b."""

    config: str  # the entry as written, e.g. "256-h"
    num_experts: int
    num_groups: int | None = None
    group_size: int | None = None

    @property
    def hierarchical(self) -> bool:
        return self.num_groups is not None

    def layer_config(self, d_model: int, d_hidden: int, k: int) -> MoEConfig:
        """The measured layer's config: top-k over the experts, or 2 + 2 over a x b."""
        if self.hierarchical:
            return MoEConfig(
                d_model=d_model,
                d_hidden=d_hidden,
                num_groups=self.num_groups,
                group_size=self.group_size,
            )
        return MoEConfig(d_model=d_model, d_hidden=d_hidden, num_experts=self.num_experts, k=k)


def train_flops(tokens: int, d_model: int, d_hidden: int, k: int, num_gate_outputs: int) -> int:
    """Analytic FLOPs of one MoE training step (forward + backward), as achieved GFLOP/s counts them:
    tokens x flops.moe_layer_train_flops_per_token (2 FLOPs per multiply-add, backward = 2x
    forward; k active experts of 2·d·h weights, 2·d gate weights per output).

    num_gate_outputs = gate_outputs(spec); 0 gives the dense baseline, the expert term alone (k·h
    hidden units). Elementwise work is not counted.
    """
    return tokens * moe_layer_train_flops_per_token(d_model, d_hidden, k, num_gate_outputs)


def gate_outputs(spec: ExpertSpec) -> int:
    if spec.hierarchical:
        assert spec.num_groups is not None and spec.group_size is not None  # hierarchical: set
        return spec.num_groups + K_PRIMARY * spec.group_size
    return spec.num_experts


def parse_experts(text: str) -> list[ExpertSpec]:
    """'4,256-h,16x64-h' -> specs. `N-h` is a x b with a = 2**floor(log2(N)/2), b = N/a."""
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        if m := re.fullmatch(r"([1-9]\d*)", entry):
            specs.append(ExpertSpec(entry, int(m[1])))
            continue
        if m := re.fullmatch(r"([1-9]\d*)-h", entry):
            n = int(m[1])
            a = 2 ** ((n.bit_length() - 1) // 2)  # floor(log2 n) // 2 == floor(log2(n) / 2)
            b = n // a
        elif m := re.fullmatch(r"([1-9]\d*)x([1-9]\d*)-h", entry):
            a, b = int(m[1]), int(m[2])
            n = a * b
        else:
            raise ValueError(
                f"--experts: bad entry {entry!r}; expected N (flat), N-h or AxB-h (hierarchical)"
            )
        if a * b != n or a < K_PRIMARY or b < K_SECONDARY:
            raise ValueError(
                f"--experts: bad entry {entry!r}; hierarchical needs N = a x b with a >= "
                f"{K_PRIMARY} groups of b >= {K_SECONDARY} experts, got a={a}, b={n / a:g}"
            )
        specs.append(ExpertSpec(entry, n, a, b))
    return specs
