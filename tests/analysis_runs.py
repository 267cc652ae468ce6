"""Runs for the analysis tests (test_analysis_*.py, test_slope.py and the reliability tests):
built in memory per moe_impl/runs/rundir.py's contract (`make_run`, the synthetic frames), or
written to disk the same way (`write_run`); `good_runs`, every sweep with numbers under which each
claim holds; `bench_frame`, a layer benchmark's rows."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pandas as pd
import yaml

from moe_impl.model import flops
from moe_impl.runs import rundir, runinfo
from moe_impl.train.config import load_config, model_config

VOCAB = 577


UNIGRAM, FLOOR = 400.0, 20.0  # the corpus's unigram and Bayes-optimal (floor) perplexities


def make_run(
    sweep: str,
    preset: str,
    ppl: float,
    *,
    early: float | None = None,
    w: tuple[float, float] = (0.1, 0.1),
    cv: tuple[float, float, float] = (0.1, 0.1, 1.3),
    load: list[int] | None = None,
    seed: int = 0,
    unigram: float | None = UNIGRAM,
    floor: float = FLOOR,
) -> dict:
    """A finished run as io.read_run returns it (config resolved by the real config loader).
    unigram, floor: the corpus's unigram and Bayes-optimal perplexities (unigram None: unknown,
    as in summaries written before it was recorded)."""
    cfg = load_config(
        overrides=[
            f"model.preset={preset}",
            f"sweep={sweep}",
            f"model.w_importance={w[0]}",
            f"model.w_load={w[1]}",
            f"train.seed={seed}",
            "tracking.enabled=false",
        ]
    )
    model = model_config(cfg, VOCAB)
    summary = dict.fromkeys(rundir.SUMMARY_KEYS)
    summary.update(
        name=model.name,
        preset=preset,
        model=model.flat(),  # the resolved model, as training writes it
        corpus={"corpus": "synthetic", "vocab_size": VOCAB}
        | ({} if unigram is None else {"unigram_perplexity": unigram}),
        test_perplexity=ppl,
        floor_nll=math.log(floor),
        test_nll=math.log(ppl),
        eval_split="test",
        params_excl_embedding_softmax=flops.params_excl_embedding_softmax(model),
        ops_per_timestep=flops.ops_per_timestep(model),
        tflops_per_device=0.002,
        mfu=0.1,
        cv_importance=cv[0],
        cv_load=cv[1],
        max_over_mean_load=cv[2],
        train_tokens=20480,
        steps=40,
        device="cpu",
        device_name="test cpu",
        snapshots=[]
        if early is None
        else [
            {
                "step": 4,
                "tokens": 2048,
                "split": "test",
                "nll": math.log(early),
                "perplexity": early,
                "excess_nll": None,
            }
        ],
    )
    expert_load = None if load is None else {"steps": 20, "tokens_per_expert": load}
    return {
        "run_dir": f"mem/{sweep}/{model.name}-{w[0]}-{w[1]}-{seed}",
        "config": cfg.to_dict(),  # as config.yaml reads back
        "summary": summary,
        "identity": {"run_id": uuid.uuid4().hex},
        "expert_load": expert_load,
    }


def write_run(root, run: dict):
    """The run directory rundir.py describes, for `run` (as make_run builds it)."""
    path = root / run["run_dir"].removeprefix("mem/")
    path.mkdir(parents=True)
    (path / rundir.CONFIG_FILE).write_text(yaml.safe_dump(run["config"], sort_keys=False))
    runinfo.write_run_identity(path, run["summary"]["name"], "moe")
    identity = rundir.read_json(path / rundir.RUN_FILE)
    run["identity"] = identity
    rundir.write_json(path / rundir.SUMMARY_FILE, run["summary"])
    if run["expert_load"] is not None:
        rundir.write_json(path / rundir.EXPERT_LOAD_FILE, run["expert_load"])
    return path


def good_runs() -> list[dict]:
    """Every sweep, with numbers under which each claim holds."""
    rng = np.random.default_rng(0)
    skewed = (rng.pareto(1.5, 256) * 100 + 1).astype(int).tolist()
    even = (rng.normal(100, 5, 256)).astype(int).tolist()
    return [
        make_run("lm1b", "cpu/4xLSTM-64", 131.0),
        make_run("lm1b", "cpu/MoE-1-Wide", 130.0),
        make_run("lm1b", "cpu/MoE-4", 128.0),
        make_run("lm1b", "cpu/MoE-32", 120.0),
        make_run("lm1b", "cpu/MoE-256", 112.0),
        make_run("lm1b", "cpu/MoE-256-h", 113.0),
        make_run("lm1b", "cpu/MoE-1024-h", 108.0),
        # N snapshots past the unigram stage: ln(85 / FLOOR) <= ln(UNIGRAM / FLOOR) / 2
        make_run("news100b", "cpu/4xLSTM-64", 60.0, early=85.0),
        make_run("news100b", "cpu/MoE-32", 56.0, early=81.0),
        make_run("news100b", "cpu/MoE-256-h", 52.0, early=78.0),
        make_run("news100b", "cpu/MoE-16384-h", 47.0, early=76.0),
        make_run("news100b", "cpu/MoE-65536-h", 45.0, early=75.0),
        make_run("news100b", "cpu/MoE-131072-h", 46.0, early=77.0),
        make_run("balance", "cpu/MoE-256", 125.0, w=(0, 0), cv=(2.0, 1.8, 9.0), load=skewed),
        make_run("balance", "cpu/MoE-256", 112.0, w=(0.1, 0.1), cv=(0.1, 0.08, 1.2), load=even),
        make_run("balance", "cpu/MoE-256", 113.0, w=(0, 0.1), cv=(0.3, 0.1, 1.5)),
    ]


def bench_frame() -> pd.DataFrame:
    """Two tokens modes; the fixed-tokens flat rows share the peers' configuration (peers.csv)."""
    rows = []
    for mode, tokens in (("fixed_tokens", 4096), ("fixed_tokens_per_expert", None)):
        for kind, n in (("flat", 4), ("flat", 32), ("hierarchical", 256)):
            t = tokens or n * 16
            rows.append(
                {
                    "kind": kind,
                    "num_experts": n,
                    "tokens": t,
                    "tokens_mode": mode,
                    "target_tokens_per_expert": None if tokens else 64.0,
                    "d_model": 64,
                    "d_hidden": 128,
                    "k": 4,
                    "threads": 1,
                    "device": "cpu",
                    "status": "ok",
                    "moe_us_per_token": 10.0 + n / 10,
                    "dense_us_per_token": 5.0,
                    "ratio_median": 2.0 + n / 100,
                    "moe_gflops": 30.0,
                    "mfu": 0.2,
                }
            )
    rows.append({**rows[-1], "num_experts": 131072, "status": "skipped"})
    return pd.DataFrame(rows)


def seeded_runs(sweep: str, runs: dict[str, tuple], **kw) -> list[dict]:
    """One run per (preset, perplexity); runs: preset -> perplexities (or (perplexity, early)
    pairs) of its seeds."""
    out = []
    for preset, values in runs.items():
        for seed, v in enumerate(values):
            ppl, early = v if isinstance(v, tuple) else (v, None)
            out.append(make_run(sweep, f"cpu/{preset}", ppl, early=early, seed=seed, **kw))
    return out
