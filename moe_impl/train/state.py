"""What a run keeps to continue: the loop's own state, its checkpoints, and its run directory.

A checkpoint (moe_impl/train/checkpoint.py writes the files) holds the model and optimizer states,
the wall time so far, the `LoopState` under the keys of `LoopState.to_checkpoint`, and the run's
resolved config (`config`, RunConfig.to_dict; checkpoints written before it have none). Restoring
one also rewrites metrics.jsonl to what the checkpoint had logged, so a resumed run logs every
step once, and refuses a config whose values differ from the checkpoint's (before any state is
loaded). `prepare_run_dir` writes config.yaml and run.json at the start: into an empty directory,
or, on --resume, keeps them when the config has the same values (moe_impl/train/identity.py);
`replace_changed` sets a run with other values aside and starts a new one in its place.

A run directory that lost its config.yaml is judged by its newest intact checkpoint's config
(`lost_config`): `restore_config` writes config.yaml back from it (the CLI's --resume without
--config); where nothing holds the run's config (no checkpoint, or only older ones) a resume is
refused in one line, never run under a default config.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moe_impl.parallel import shard_state
from moe_impl.parallel.context import Context
from moe_impl.runs import expertstats, rundir, runinfo
from moe_impl.runs import lock as runlock
from moe_impl.train import checkpoint, identity
from moe_impl.train.config import RunConfig, dump

STATS = ("cv_importance", "cv_load", "max_over_mean_load")  # routing statistics of a step
STATS_WINDOW = 20  # the summary's routing statistics and expert load: the last this many steps


@dataclass(kw_only=True)
class LoopState:
    """The training loop's progress (mutable: the loop advances it every step)."""

    step: int = 0  # steps done
    lstm_state: list | None = None  # carried between batches by corpora that continue rows
    train_time: float = 0.0  # seconds in training steps (evaluation excluded)
    # of which waiting for the step's batch (prefetch.py); None: some were trained by code that
    # did not count it (a checkpoint from before the count)
    input_wait: float | None = 0.0
    scored_tokens: int = 0  # training tokens scored so far
    expert_load: np.ndarray | None = None  # tokens per expert over the last steps (summary window)
    snapshots: list[dict] = field(default_factory=list)  # evaluations during training
    recent_stats: list[dict] = field(default_factory=list)  # routing statistics, the last steps
    earlier_wall_time: float = 0.0  # wall time of the run's earlier segments (before a resume)
    # MoE runs: per-expert load and Importance since the last record (runs/expertstats.py)
    expert_tally: expertstats.ExpertTally | None = None

    def advance(self, record: dict, seconds: float) -> None:
        """Count one trained step (its metrics record, the seconds it took)."""
        self.train_time += seconds
        if self.input_wait is not None:
            self.input_wait += record.get("input_wait_s", 0.0)
        self.step += 1
        self.scored_tokens += record["scored_tokens"]
        if "cv_importance" in record:
            self.recent_stats = [*self.recent_stats, {k: record[k] for k in STATS}][-STATS_WINDOW:]

    def to_checkpoint(self) -> dict:
        """The checkpoint's keys for this state (the format checkpoints have always had)."""
        return {
            "step": self.step,
            "state": self.lstm_state,
            "train_time": self.train_time,
            "input_wait": self.input_wait,
            "scored_tokens": self.scored_tokens,
            "expert_load": self.expert_load,
            "snapshots": self.snapshots,
            "recent_stats": self.recent_stats,
            "expert_tally": None if self.expert_tally is None else self.expert_tally.to_dict(),
        }

    @classmethod
    def from_checkpoint(cls, saved: dict, device: torch.device) -> LoopState:
        """The state a checkpoint holds; its wall time (`save_checkpoint` writes the run's wall time
        so far) is what the resumed segment continues from."""
        lstm_state = saved["state"]
        if lstm_state is not None:
            lstm_state = [tuple(t.to(device) for t in s) for s in lstm_state]
        return cls(
            step=saved["step"],
            lstm_state=lstm_state,
            train_time=saved["train_time"],
            input_wait=saved.get("input_wait"),  # None in checkpoints from before it was counted
            scored_tokens=saved["scored_tokens"],
            expert_load=saved["expert_load"],
            snapshots=saved["snapshots"],
            recent_stats=saved["recent_stats"],
            earlier_wall_time=saved["wall_time"],
            # None in checkpoints from before issue 31: the tally starts again at the resume
            expert_tally=expertstats.ExpertTally.from_dict(saved.get("expert_tally")),
        )


def prepare_run_dir(
    run_dir: Path,
    cfg: RunConfig,
    *,
    resume: bool,
    ctx: Context,
    name: str,
    experiment: str,
    replace_changed: bool = False,
    card: dict | None = None,
) -> None:
    """Check, then write config.yaml and run.json (rank 0; with the run's `card`, train/card.py). A new run needs an empty (or no)
    directory; a resumed one the values it was started with (identity.differences), else a
    ValueError lists each differing key, or, with `replace_changed`, the old run directory is set
    aside (identity.set_aside, every file kept) and a new run starts in its place."""
    config_path = run_dir / rundir.CONFIG_FILE
    # every rank checks before any writes, so all raise alike
    runlock.check_run_dir(run_dir)  # not a file; no other process training into it
    if run_dir.exists() and _has_files(run_dir) and not resume:
        raise ValueError(
            f"run directory {str(run_dir)!r} is not empty; pass --resume to continue it or choose "
            "another --out"
        )
    changed = _config_change(run_dir, cfg, replace_changed) if resume else None
    if changed and not replace_changed:
        raise ValueError(
            f"config differs from the run in {str(run_dir)!r}: {changed}; resume it with its "
            f"saved config (--out {run_dir} --resume, no --config or --set), start a new --out, "
            "or pass --replace-changed to set the old run aside and start a new one"
        )
    ctx.barrier()
    if ctx.is_main:
        if changed:
            old = identity.set_aside(run_dir)
            print(
                f"config differs from the run in {str(run_dir)!r} ({changed}): moved it to "
                f"{str(old)!r}, starting a new run",
                file=sys.stderr,
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        runlock.acquire(run_dir)  # held until Trainer.run ends (or the process does)
        if not config_path.exists():  # a resumed run keeps the file it was started with
            rundir.write_text(config_path, dump(cfg))
        runinfo.write_run_identity(run_dir, name, experiment, card)
    ctx.barrier()


def _has_files(run_dir: Path) -> bool:
    """Whether the directory holds anything but the lock file a process may have left."""
    return any(not runlock.is_lock_file(p) for p in run_dir.iterdir())


def _config_change(run_dir: Path, cfg: RunConfig, replace_changed: bool) -> str | None:
    """What differs between the run in run_dir and cfg, in words (None: nothing, or no run). A run
    directory without config.yaml is compared with its checkpoint's config (lost_config)."""
    try:
        diffs = identity.changes(run_dir, cfg)
        if diffs is None and (lost := lost_config(run_dir, config_given=True)) is not None:
            diffs = identity.differences(lost[0], cfg)
    except ValueError as err:  # an unreadable or lost config: a run that cannot be continued
        if not replace_changed:
            raise
        return str(err)
    return identity.describe(diffs) if diffs else None


def checkpoint_config(run_dir: Path) -> tuple[dict | None, Path] | None:
    """(the config its newest intact checkpoint carries, None for one written before checkpoints
    carried it; that checkpoint), or None when the run directory has no intact checkpoint.
    Reads rank 0's file (every rank's file carries the config)."""
    for path in checkpoint.candidates(run_dir):
        try:
            saved = checkpoint.load(
                path, "cpu", rank=0, world_size=checkpoint.world_size_of(path), mmap=True
            )
        except checkpoint.DamagedCheckpoint:
            continue  # the resume falls back the same way, with its warning
        return saved.get("config"), path
    return None


def _config_from_checkpoint(values: dict, path: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"the config in checkpoint {str(path)!r} cannot be read: {err}") from None


def lost_config(run_dir: Path, *, config_given: bool) -> tuple[RunConfig, Path] | None:
    """For a resume of a run directory without config.yaml: (the config its newest intact
    checkpoint carries, that checkpoint). None where nothing is lost: config.yaml is there, the
    directory is missing or empty (a new run), or, with a config given (`config_given`), an
    unfinished run with no intact checkpoint (it trains again from step 0). ValueError (one line)
    where the run's config is nowhere: no checkpoint (a finished run, or no config given), or one
    written before checkpoints carried it (its values cannot be checked)."""
    path = run_dir / rundir.CONFIG_FILE
    if path.exists() or not run_dir.is_dir() or not _has_files(run_dir):
        return None
    found = checkpoint_config(run_dir)
    if found is None:
        _no_checkpoint(run_dir, config_given)
        return None
    values, ckpt = found
    if values is None:
        raise ValueError(
            f"{str(path)!r} is missing and checkpoint {ckpt.name} was written before checkpoints "
            "carried the run's config, so its values cannot be checked: put the run's "
            "config.yaml back, or start a new --out"
        )
    return _config_from_checkpoint(values, ckpt), ckpt


def _no_checkpoint(run_dir: Path, config_given: bool) -> None:
    """lost_config without an intact checkpoint: None (train again from step 0) for an unfinished
    run with a config given; otherwise the refusal."""
    path = run_dir / rundir.CONFIG_FILE
    if rundir.is_finished(run_dir):
        raise ValueError(
            f"{str(path)!r} is missing and no checkpoint holds the finished run's config: put the "
            "run's config.yaml back (a default one would contradict its summary.json), or train "
            f"it again with --config FILE --replace-changed (sets {str(run_dir)!r} aside) or into "
            "a new --out"
        )
    if config_given:
        return None
    raise ValueError(
        f"{str(path)!r} is missing and no intact checkpoint holds the run's config: pass the "
        "run's --config to train it again from step 0, or start a new --out"
    )


def restore_config(run_dir: Path) -> None:
    """--resume without --config: write a lost config.yaml back from the newest intact checkpoint
    (lost_config), with one line on stderr (rank 0 under torchrun); ValueError where nothing holds
    the run's config. Every process may write it: the same text, through its own temporary file."""
    lost = lost_config(run_dir, config_given=False)
    if lost is None:
        return
    cfg, ckpt = lost
    path = run_dir / rundir.CONFIG_FILE
    rundir.write_text(path, dump(cfg), per_process=True)
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank; the process group is not up yet
        print(
            f"restored {str(path)!r}, which was missing, from the config of checkpoint {ckpt.name}",
            file=sys.stderr,
        )


def save_checkpoint(
    run_dir: Path,
    loop: LoopState,
    wall_time: float,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    ctx: Context,
    *,
    keep: int,
    config: dict,
) -> None:
    """This process's checkpoint of the loop's step, with the run's resolved `config`
    (RunConfig.to_dict); distributed: rank 0 writes the replicated layers, every rank its experts
    (and the config)."""
    model_state, opt_states = shard_state.local_state(model, optimizers, ctx.rank)
    checkpoint.save(
        run_dir,
        loop.step,
        {
            **loop.to_checkpoint(),
            "model": model_state,
            "optimizers": opt_states,
            "wall_time": wall_time,
            "config": config,
        },
        keep=keep,
        rank=ctx.rank,
        world_size=ctx.world_size,
        barrier=ctx.barrier,
    )


def restore_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    ctx: Context,
    device: torch.device,
    cfg: RunConfig,
) -> LoopState:
    """Load the model and optimizer states of checkpoint `path` (resharded when another number of
    processes wrote it) and return the loop state it holds; ValueError, before any state is
    loaded, when `cfg` has other values than the config the checkpoint carries."""
    rank, world = ctx.rank, ctx.world_size
    old_world = checkpoint.world_size_of(path)
    if old_world == world:
        saved = checkpoint.load(path, device, rank=rank, world_size=world)
        model_state, opt_states = saved["model"], saved["optimizers"]
        if rank != 0:  # the replicated layers are in rank 0's file
            main = checkpoint.load(path, "cpu", rank=0, world_size=world, mmap=True)
            model_state, opt_states = shard_state.merged_state(model, optimizers, main, saved)
    else:  # written by another number of processes: reshard (reads every old file)
        old = [
            checkpoint.load(path, "cpu", rank=r, world_size=old_world, mmap=True)
            for r in range(old_world)
        ]
        model_state, opt_states, lstm_state = shard_state.resharded_state(
            model, optimizers, old, rank, world
        )
        saved = {**old[0], "state": lstm_state}
    check_trained_with(saved, path, cfg)
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, opt_states, strict=True):
        opt.load_state_dict(state)
        shard_state.state_to_param_devices(opt)
    return LoopState.from_checkpoint(saved, device)


def check_trained_with(saved: dict, path: Path, cfg: RunConfig) -> None:
    """ValueError (one line, each differing key) when the config a checkpoint carries has other
    values than `cfg` (identity.differences: train.threads, train.progress may differ); nothing
    to check in a checkpoint written before checkpoints carried the config."""
    if saved.get("config") is None:
        return
    diffs = identity.differences(_config_from_checkpoint(saved["config"], path), cfg)
    if diffs:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with other values than the config given: "
            f"{identity.describe(diffs)} (checkpoint -> config); resume with the values it was "
            "trained with (config.yaml as the run wrote it), or start a new --out"
        )


def resumed_state(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    ctx: Context,
    device: torch.device,
    *,
    cfg: RunConfig,
) -> LoopState:
    """The loop state to continue an unfinished run from: its newest intact checkpoint's (the model
    and optimizers restored, metrics.jsonl cut back to it), or a fresh start when it was killed
    before its first checkpoint (what it logged is forgotten); the expert statistics
    (runs/expertstats.py) are cut back the same way. A damaged checkpoint is skipped for the one
    before it, with a warning; ValueError when every one is damaged, or when the newest
    intact one was trained with other values than `cfg` (check_trained_with)."""
    try:
        loop = _restore_newest_intact(run_dir, model, optimizers, ctx, device, cfg)
    except BaseException:
        runlock.release(run_dir)  # Trainer.run, which lets it go, will not run
        raise
    if ctx.is_main:
        if loop is not None:
            truncate_metrics(run_dir, loop)
        else:
            (run_dir / rundir.METRICS_FILE).unlink(missing_ok=True)
        expertstats.truncate(run_dir, loop.step if loop is not None else 0)
    ctx.barrier()
    return loop if loop is not None else LoopState()


def _restore_newest_intact(
    run_dir: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    ctx: Context,
    device: torch.device,
    cfg: RunConfig,
) -> LoopState | None:
    """Restore the newest checkpoint whose files every process finds intact (the processes agree,
    so all resume from one step); None when there is no checkpoint."""
    found = checkpoint.candidates(run_dir)
    skipped: list[tuple[Path, checkpoint.DamagedCheckpoint | None]] = []
    for path in found:
        problem = None
        try:
            loop = restore_checkpoint(path, model, optimizers, ctx, device, cfg)
        except checkpoint.DamagedCheckpoint as err:  # raised before anything is restored
            problem = err  # (a process that did restore this one restores the next over it)
        if ctx.all_agree(problem is None, device):
            for bad, bad_err in skipped:  # each process reports what it found; rank 0 the rest
                if bad_err is not None or ctx.is_main:
                    what = bad_err or f"checkpoint {str(bad)!r} is damaged on another process"
                    print(
                        f"warning: {what}; resumed from the previous intact checkpoint, "
                        f"{path.name} (step {loop.step}): the steps after it are trained again",
                        file=sys.stderr,
                    )
            return loop
        skipped.append((path, problem))
    if not found:
        return None
    folder = run_dir / rundir.CHECKPOINT_DIR
    reasons = "; ".join(
        f"{err.file.relative_to(folder) if err.file.is_relative_to(folder) else err.file} "
        f"{err.reason}"
        if err is not None
        else f"{path.name} is damaged on another process"
        for path, err in skipped
    )
    raise ValueError(
        f"--resume: no intact checkpoint in {str(folder)!r} ({reasons}); start the run again "
        f"with a new --out, or delete {str(folder)!r} to train this one again from step 0"
    )


def truncate_metrics(run_dir: Path, loop: LoopState) -> None:
    """Drop the metrics.jsonl lines logged after the checkpoint of `loop` (they would be logged
    again): later steps, and evaluations at its step unless they are snapshots it holds."""
    snapshot_steps = {snap["step"] for snap in loop.snapshots}
    kept = [
        r
        for r in rundir.read_metrics(run_dir)
        if r.get("step", 0) < loop.step
        or (r.get("step") == loop.step and (r["kind"] == "train" or loop.step in snapshot_steps))
    ]
    path = run_dir / rundir.METRICS_FILE
    rundir.write_text(path, "".join(rundir.dumps(r) + "\n" for r in kept))
