"""Run directories (the source of truth, moe_impl/runs/rundir.py) -> tidy frames, and the views on them
that the figures, tables and report share.

`collect_runs(roots)` gives three frames (`Collected`) and the run directories it left out:
  summary    one row per finished run: identity (run_id, run_dir, sweep, name, preset), the model's
             structure from summary.json's "model" (model, paper_model, family, moe, num_experts,
             num_groups, group_size, k, d_model, d_hidden), the balancing weights, seed, then every
             other summary.json key (nested dicts flattened as `corpus.vocab_size` by
             moe_impl.runs.runinfo.flatten; the snapshots list goes to the next frame).
  snapshots  one row per evaluation: every entry of summary.json's "snapshots" (kind "snapshot",
             e.g. after N tokens for Figure 3, Table 8) plus the final one (kind "final").
  loads      one row per (run, expert): expert_load.json's true load (routed slots) per expert.
`collect_mlflow(experiment, uri, scratch)` builds the same frames from an MLflow store (through
moe_impl.tracking.export_runs; runs without artifacts fall back to params + metrics).
Nothing here draws or judges; reading and writing files is analysis/io.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml

from analysis import io, paper
from moe_impl.bench.spec import OURS
from moe_impl.model.presets import ALL_PRESETS
from moe_impl.model.regime import PAPER_NAME  # the scaled families' stand-ins
from moe_impl.runs import rundir, runinfo
from moe_impl.runs.runsummary import RunSummary
from moe_impl.train.config import MODEL_FIELDS, resolve_model

FAMILY = {"flat": "flat MoE", "hierarchical": "hierarchical MoE", "dense": "baseline"}
FAMILIES = ("baseline", "flat MoE", "hierarchical MoE")
K40_PEAK_TFLOPS = 4.29  # Sec. 5.1: NVIDIA's theoretical K40 peak, as the paper quotes it
IDENTITY_COLUMNS = [
    "run_id",
    "run_dir",
    "sweep",
    "name",
    "experiment",
    "preset",
    "model",
    "paper_model",
    "family",
    "moe",
    "num_experts",
    "num_groups",
    "group_size",
    "k",
    "d_model",
    "d_hidden",
    "w_importance",
    "w_load",
    "dropout",
    "seed",
]
SNAPSHOT_COLUMNS = [
    "run_id",
    "sweep",
    "name",
    "model",
    "kind",
    "step",
    "tokens",
    "split",
    "nll",
    "perplexity",
    "excess_nll",
]
LOAD_COLUMNS = ["run_id", "sweep", "name", "expert", "tokens", "steps"]


class Collected(NamedTuple):
    summary: pd.DataFrame
    snapshots: pd.DataFrame
    loads: pd.DataFrame


def family(moe: str) -> str:
    """'flat MoE', 'hierarchical MoE', or 'baseline' (no MoE, or one always-active expert)."""
    return FAMILY.get(moe, "baseline")


def model_info(model: dict) -> dict:
    """The structure columns of a run from its resolved model: summary.json's "model", the
    fields of moe_impl's ModelConfig (k is the experts per token: k, or k_primary·k_secondary)."""
    name, moe = model["name"], model["moe"]
    k = model.get("k") if moe == "flat" else None
    if moe == "hierarchical":
        k = model["k_primary"] * model["k_secondary"]
    return {
        "model": name,
        "paper_model": PAPER_NAME.get(name, name),
        "family": family(moe),
        "moe": moe,
        "num_experts": model["num_experts"],
        "num_groups": model.get("num_groups"),
        "group_size": model.get("group_size"),
        "k": k,
        "d_model": model["d_model"],
        "d_hidden": model.get("d_hidden") or None,
    }


def resolved_model(run: dict) -> dict:
    """summary.json's "model". A summary without one (an MLflow run whose artifacts could not be
    downloaded: its summary comes from metrics; or a run written before summaries carried the
    model) gets the config's `model` section resolved as training resolves it."""
    cfg, summary = run["config"], RunSummary.from_dict(run["summary"])
    if isinstance(summary.model, dict):
        return summary.model
    corpus = summary.corpus
    vocab = corpus.get("vocab_size") if isinstance(corpus, dict) else None
    section = cfg.get("model") or {}
    overrides = {k: section.get(k) for k in MODEL_FIELDS}
    return resolve_model(section["preset"], overrides, int(vocab or 1000)).flat()


# summary.json's values that are not numbers (rundir.SUMMARY_KEYS: the others are numbers or null)
NON_NUMERIC_KEYS = {"model"}


def check_summary(run: dict) -> None:
    """A finished run's summary as the verdicts need it, else a ValueError naming the file: a
    finite test perplexity, numbers (or null) under the numeric keys, a list of snapshot objects.
    A missing or non-numeric value would become a NaN row that a claim's rule then reads."""
    summary, where = run["summary"], f"{run['run_dir']}/{rundir.SUMMARY_FILE}"
    ppl = summary.get("test_perplexity")
    if runinfo.number(ppl) is None:  # a finite number (runinfo.number)
        got = "no test_perplexity" if ppl is None else f"test_perplexity {io.kind_of(ppl)}"
        raise ValueError(f"{where}: {got}, expected a finite number")
    for key in set(rundir.SUMMARY_KEYS) - NON_NUMERIC_KEYS:
        value = summary.get(key)
        if value is not None and not io.is_number(value):
            raise ValueError(f"{where}: {key} is {io.kind_of(value)}, expected a number or null")
    snapshots = summary.get("snapshots") or []
    if not isinstance(snapshots, list) or not all(isinstance(s, dict) for s in snapshots):
        raise ValueError(
            f"{where}: snapshots should be a list of objects, got {io.kind_of(snapshots)}"
        )
    for snap in snapshots:
        tokens = snap.get("tokens")
        if not io.is_number(snap.get("perplexity")) or not (tokens is None or io.is_number(tokens)):
            raise ValueError(f"{where}: a snapshot without a numeric perplexity: {str(snap)[:80]}")


def run_record(run: dict) -> dict:
    """One summary row from io.read_run's dict."""
    check_summary(run)
    cfg, summary, identity = run["config"], run["summary"], run["identity"]
    model = cfg.get("model") or {}
    try:
        info = model_info(resolved_model(run))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{run['run_dir']}: cannot resolve the model ({err})") from None
    row = {
        "run_id": identity.get("run_id") or run["run_dir"],
        "run_dir": run["run_dir"],
        "sweep": cfg.get("sweep") or "",
        "name": RunSummary.from_dict(summary).name
        or cfg.get("name")
        or identity.get("name")
        or info["model"],
        "experiment": cfg.get("experiment") or identity.get("experiment"),
        "preset": model.get("preset"),
        **info,
        "w_importance": model.get("w_importance"),
        "w_load": model.get("w_load"),
        "dropout": model.get("dropout"),
        "seed": (cfg.get("train") or {}).get("seed"),
    }
    # the model's structure is in the identity columns; the snapshots are the next frame
    rest = {k: v for k, v in summary.items() if k not in ("model", "snapshots")}
    for key, value in runinfo.flatten(rest).items():
        row.setdefault(key, value)
    return row


def snapshot_records(run: dict, row: dict) -> list[dict]:
    """summary.json's snapshots plus the final evaluation (a snapshot at the final step, the
    same model, is dropped)."""
    summary = RunSummary.from_dict(run["summary"])
    ident = {k: row[k] for k in ("run_id", "sweep", "name", "model")}
    final = {
        **ident,
        "kind": "final",
        "step": summary.steps,
        "tokens": summary.train_tokens,
        "split": summary.eval_split,
        "nll": summary.test_nll,
        "perplexity": summary.test_perplexity,
        "excess_nll": summary.excess_nll,
    }
    out = [
        {**ident, "kind": "snapshot", **{k: s.get(k) for k in SNAPSHOT_COLUMNS[5:]}}
        for s in summary.snapshots or []
        if s.get("step") != final["step"]
    ]
    return [*out, final]


def load_records(run: dict, row: dict) -> list[dict]:
    load = run.get("expert_load")
    if not load:
        return []
    ident = {k: row[k] for k in ("run_id", "sweep", "name")}
    steps = load.get("steps")
    return [
        {**ident, "expert": i, "tokens": t, "steps": steps}
        for i, t in enumerate(load.get("tokens_per_expert") or [])
    ]


def frames(runs: Iterable[dict]) -> Collected:
    """The three frames from io.read_run dicts (rows in the order given)."""
    rows, snaps, loads = [], [], []
    for run in runs:
        row = run_record(run)
        rows.append(row)
        snaps += snapshot_records(run, row)
        loads += load_records(run, row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return Collected(
            summary, pd.DataFrame(columns=SNAPSHOT_COLUMNS), pd.DataFrame(columns=LOAD_COLUMNS)
        )
    # a fixed order whatever the source: identity, SUMMARY_KEYS, the other keys by name
    keys = [k for k in rundir.SUMMARY_KEYS if k in summary and k not in IDENTITY_COLUMNS]
    rest = sorted(set(summary.columns) - set(IDENTITY_COLUMNS) - set(keys))
    summary = summary[IDENTITY_COLUMNS + keys + rest]
    summary = summary.sort_values(["sweep", "name", "run_id"], kind="stable")
    order = {r: i for i, r in enumerate(summary["run_id"])}
    snaps_df = pd.DataFrame(snaps, columns=SNAPSHOT_COLUMNS)
    snaps_df = snaps_df.sort_values(["run_id", "tokens"], key=_by(order), kind="stable")
    loads_df = pd.DataFrame(loads, columns=LOAD_COLUMNS)
    loads_df = loads_df.sort_values(["run_id", "expert"], key=_by(order), kind="stable")
    return Collected(*(df.reset_index(drop=True) for df in (summary, snaps_df, loads_df)))


def _by(order: dict):
    """Sort key: run_id by the summary's row order, other columns as they are."""
    return lambda col: col.map(order) if col.name == "run_id" else col


class Skipped(NamedTuple):
    """A run directory collect left out, and why (the CLI prints one line each)."""

    run_dir: Path
    why: str


def collect_runs(roots: str | Path | Iterable[str | Path]) -> tuple[Collected, list[Skipped]]:
    """(frames of every finished run directory under the root(s), the runs left out: unfinished
    ones and diverged ones). A root may be a run directory itself (io.find_run_dirs)."""
    finished, unfinished = io.find_run_dirs(roots)
    skipped = [Skipped(d, f"unfinished, no {rundir.SUMMARY_FILE}") for d in unfinished]
    runs = []
    for d in finished:
        run = io.read_run(d)
        # a run whose final evaluation diverged (summary.json's `diverged`, written by the
        # trainer with the perplexity null) has no perplexity to compare: left out
        why = RunSummary.from_dict(run["summary"]).diverged
        if why:
            skipped.append(Skipped(d, f"diverged ({why})" if isinstance(why, str) else "diverged"))
        else:
            runs.append(run)
    if not runs:
        names = ", ".join(map(str, [roots] if isinstance(roots, str | Path) else roots))
        raise ValueError(f"no finished run directory (with {rundir.SUMMARY_FILE}) under {names}")
    return frames(runs), skipped


# --- MLflow ------------------------------------------------------------------------------------


def _param_value(text: str):
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_from_mlflow(export: dict) -> dict:
    """An io.read_run-shaped dict from one moe_impl.tracking.export_runs entry: the downloaded
    run files where present, else the config from params and the summary from metrics."""
    folder = export.get("dir")
    if folder is not None and (Path(folder) / rundir.SUMMARY_FILE).is_file():
        run = io.read_run(folder)
        return {**run, "run_dir": f"mlflow:{export['mlflow_run_id']}"}
    config: dict = {}
    for key, text in export["params"].items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _param_value(text)
    metrics = export["metrics"]
    summary = {k: metrics.get(k) for k in rundir.SUMMARY_KEYS}
    summary["name"] = export["run_name"]
    evals = _evals_from_history(export["history"])
    final_step = summary["steps"] if summary["steps"] is not None else max(evals, default=None)
    summary["steps"] = None if final_step is None else int(final_step)
    summary["snapshots"] = [e for step, e in sorted(evals.items()) if step != final_step]
    identity = {"run_id": export["tags"].get("moe.run_id") or export["mlflow_run_id"]}
    return {
        "run_dir": f"mlflow:{export['mlflow_run_id']}",
        "config": config,
        "summary": summary,
        "identity": identity,
        "expert_load": None,
    }


def _evals_from_history(history: dict) -> dict[int, dict]:
    """{step: snapshot dict} from `<split>/perplexity`, `<split>/nll`, ... metric histories."""
    evals: dict[int, dict] = {}
    for key, points in history.items():
        split, _, name = key.partition("/")
        if name not in ("perplexity", "nll", "excess_nll", "tokens", "scored_tokens"):
            continue
        for step, value in points:
            evals.setdefault(int(step), {"step": int(step), "split": split})[name] = value
    return {s: e for s, e in evals.items() if "perplexity" in e}


def collect_mlflow(experiment: str, uri: str | None, scratch: str | Path) -> Collected:
    """The frames of an MLflow experiment's finished runs (artifacts downloaded into scratch)."""
    from moe_impl import tracking  # the only module that talks to MLflow

    uri = tracking.resolve_tracking_uri(uri)
    tracking.store.require_store(uri)  # reading creates no empty store
    exports = tracking.export_runs(experiment, scratch, tracking_uri=uri)
    if not exports:
        raise ValueError(f"MLflow experiment {experiment!r} has no finished runs")
    return frames(run_from_mlflow(e) for e in exports)


# --- views shared by figures, tables and the report ---------------------------------------------


def sweep(summary: pd.DataFrame, name: str) -> pd.DataFrame:
    """The runs of one sweep (config key `sweep`); an empty frame when none or no column."""
    if summary.empty or "sweep" not in summary:
        return summary.iloc[0:0]
    return summary[summary["sweep"].fillna("") == name]


def per_model(
    df: pd.DataFrame,
    values: list[str],
    keys: list[str] | None = None,
    spread: list[str] | None = None,
) -> pd.DataFrame:
    """Mean of `values` over the runs (seeds) of each model, with n_runs; sorted by experts.

    spread: values whose seed-to-seed spread is added as `<value>_sd` (sample SD, ddof = 1; NaN
    for a model with one run), `<value>_min` and `<value>_max`."""
    keys = keys or ["family", "model", "paper_model", "moe", "num_experts"]
    extra = [f"{v}_{s}" for v in spread or [] for s in ("sd", "min", "max")]
    if df.empty:
        return pd.DataFrame(columns=[*keys, *values, "n_runs", *extra])
    present = [v for v in values if v in df]
    g = df.groupby(keys, dropna=False, sort=False)
    out = g[present].mean(numeric_only=True).join(g.size().rename("n_runs"))
    for v in spread or []:
        if v not in df:
            continue
        x = pd.to_numeric(df[v], errors="coerce").astype(float)
        s = x.groupby([df[k] for k in keys], dropna=False, sort=False).agg(["std", "min", "max"])
        out = out.join(s.rename(columns={"std": f"{v}_sd", "min": f"{v}_min", "max": f"{v}_max"}))
    out = out.reset_index()
    for v in [*values, *extra]:
        if v not in out:
            out[v] = np.nan
    return out.sort_values(["num_experts", "model"], kind="stable").reset_index(drop=True)


EARLY_LATE = ["early_tokens", "early_perplexity", "late_tokens", "late_perplexity", "gap"]


def early_late(summary: pd.DataFrame, snapshots: pd.DataFrame, name: str) -> pd.DataFrame:
    """Figure 3's two points per run of sweep `name`: the earliest snapshot (N tokens) and the
    final evaluation (10N in the news100b sweep), and gap = early - late perplexity (Fig. 3).

    Columns: run_id, model, paper_model, family, num_experts, params_excl_embedding_softmax,
    early_tokens, early_perplexity, late_tokens, late_perplexity, gap. Runs without a snapshot
    before the final evaluation are left out.
    """
    runs = sweep(summary, name)
    cols = [
        "run_id",
        "model",
        "paper_model",
        "family",
        "moe",
        "num_experts",
        "params_excl_embedding_softmax",
    ]
    out_cols = [*cols, *EARLY_LATE]
    if runs.empty or snapshots.empty:
        return pd.DataFrame(columns=out_cols)
    snaps = snapshots[snapshots["run_id"].isin(runs["run_id"])].sort_values(["run_id", "tokens"])
    early = snaps[snaps["kind"] == "snapshot"].groupby("run_id").first()
    late = snaps[snaps["kind"] == "final"].groupby("run_id").last()
    both = early.index.intersection(late.index)
    out = runs.set_index("run_id").loc[both, cols[1:]].reset_index()
    out["early_tokens"] = early.loc[both, "tokens"].to_numpy()
    out["early_perplexity"] = early.loc[both, "perplexity"].to_numpy()
    out["late_tokens"] = late.loc[both, "tokens"].to_numpy()
    out["late_perplexity"] = late.loc[both, "perplexity"].to_numpy()
    out = out[out["late_tokens"] > out["early_tokens"]]
    out["gap"] = out["early_perplexity"] - out["late_perplexity"]
    return out[out_cols].sort_values("params_excl_embedding_softmax").reset_index(drop=True)


def at_common_tokens(
    summary: pd.DataFrame, snapshots: pd.DataFrame, name: str
) -> tuple[pd.DataFrame, int | None]:
    """Sweep `name`'s runs compared after the same number of training tokens: T = the fewest any
    run of the sweep trained, and each run's test perplexity there (its final evaluation, or the
    snapshot it took at T; Fig. 2-right's budget models train fewer tokens than the rest of the
    sweep, which evaluates them at T on the way, so every model is compared at T).

    Returns (the sweep's summary rows with test_perplexity at T, T); runs with neither are left
    out. T is None for an empty sweep. With the inverse-square-root schedule (App. C.1) the state
    after T tokens does not depend on the budget, so a snapshot at T is the run a budget of T gives.
    """
    runs = sweep(summary, name)
    if runs.empty:
        return runs, None
    tokens = int(runs["train_tokens"].min())
    final = runs["train_tokens"] == tokens
    at = runs[final].copy()
    if snapshots.empty or final.all():
        return at, tokens
    snaps = snapshots[(snapshots["kind"] == "snapshot") & (snapshots["tokens"] == tokens)]
    snap = snaps.groupby("run_id")["perplexity"].last()
    rest = runs[~final & runs["run_id"].isin(snap.index)].copy()
    rest["test_perplexity"] = rest["run_id"].map(snap)
    return pd.concat([at, rest]).reset_index(drop=True), tokens


def early_late_per_model(
    early_late_runs: pd.DataFrame, spread: list[str] | None = None
) -> pd.DataFrame:
    """early_late's frame averaged over the runs (seeds) of each model: the model size, N and
    final tokens, the perplexities there and the gap, with n_runs (per_model; spread: columns
    whose per-model SD, min and max are added)."""
    return per_model(early_late_runs, ["params_excl_embedding_softmax", *EARLY_LATE], spread=spread)


def balance(summary: pd.DataFrame, name: str = "balance") -> pd.DataFrame:
    """Table 6's rows from sweep `name`: per (w_importance, w_load), the mean test perplexity,
    CV(importance), CV(load) and max/mean load over its runs, with n_runs and the run ids."""
    cols = ["test_perplexity", "cv_importance", "cv_load", "max_over_mean_load"]
    runs = sweep(summary, name)
    if runs.empty:
        return pd.DataFrame(columns=["w_importance", "w_load", *cols, "n_runs", "run_ids"])
    g = runs.groupby(["w_importance", "w_load"], sort=True)
    out = g[cols].mean().join(g.size().rename("n_runs"))
    out = out.join(g["run_id"].agg(list).rename("run_ids"))
    return out.reset_index()


def paper_models(table: str, metrics: list[str]) -> pd.DataFrame:
    """Wide paper rows of `table` (Table 7 or 8's own columns) with moe, num_experts, family
    from the row's preset (moe_impl/model/presets.py); Kneser-Ney (no preset) is left out."""
    df = paper.load(table)
    df = df[(df["source"] == f"Table {table[-1]}") & (df["preset"] != "")]
    w = paper.wide(df, metrics)
    for m in metrics:
        if m not in w:
            w[m] = np.nan
    return w.assign(**paper_structure(w["preset"]))


def paper_structure(presets: Iterable[str]) -> dict[str, list]:
    """{"moe", "num_experts", "family"} of the paper's rows, one entry per preset name. A paper
    table names its model only (our runs read the structure from summary.json's "model"), so the
    row's preset (moe_impl/model/presets.py) is where it comes from."""
    cfgs = [ALL_PRESETS[p] for p in presets]
    return {
        "moe": [c.moe for c in cfgs],
        "num_experts": [c.num_experts for c in cfgs],
        "family": [family(c.moe) for c in cfgs],
    }


def split_bench(bench: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(our rows, the peers' rows) of bench.json frames: `bench --peers` measures the installed
    peers beside ours in the same run; files from before it have no `implementation` (all ours)."""
    if bench.empty or "implementation" not in bench:
        return bench, bench.iloc[0:0]
    ours = bench["implementation"].fillna(OURS) == OURS
    return bench[ours], bench[~ours]


def match_peers(bench: pd.DataFrame, peers: pd.DataFrame | None = None) -> pd.DataFrame:
    """peers.csv measurements whose configuration equals one of our benchmark rows: same kind
    (flat: ref, davidmrau, lucidrains; hierarchical: ref_hier, lucidrains_hier), experts, tokens,
    d_model, d_hidden, k and threads, on CPU (the peers were measured on CPU only, docs/performance.md).

    Columns: implementation, kind, num_experts, tokens, tokens_mode, paired, us_per_token,
    ratio_vs_dense (medians, NaN where the peer has none).
    """
    cols = [
        "implementation",
        "kind",
        "num_experts",
        "tokens",
        "tokens_mode",
        "paired",
        "us_per_token",
        "ratio_vs_dense",
    ]
    if bench.empty or "device" not in bench:
        return pd.DataFrame(columns=cols)
    peers = paper.load("peers") if peers is None else peers
    p = peers[peers["implementation"] != "dense"].copy()
    p["kind"] = np.where(p["implementation"].str.endswith("_hier"), "hierarchical", "flat")
    keys = ["kind", "num_experts", "tokens", "d_model", "d_hidden", "k", "threads"]
    w = p.pivot_table(
        index=["implementation", "paired", *keys], columns="metric", values="value", aggfunc="first"
    ).reset_index()
    ours = bench[bench["device"] == "cpu"][[*keys, "tokens_mode"]].drop_duplicates()
    for key in keys[1:]:
        w[key] = w[key].astype("int64")
        ours = ours.astype({key: "int64"})
    out = w.merge(ours, on=keys)
    out = out.rename(
        columns={"us_per_token_median": "us_per_token", "ratio_vs_dense_median": "ratio_vs_dense"}
    )
    for c in cols:
        if c not in out:
            out[c] = np.nan
    return out[cols].reset_index(drop=True)
