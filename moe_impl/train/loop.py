"""The training loop of `python -m moe_impl train`: config -> run directory (moe_impl/runs/rundir.py).

Paper App. C.1: Adam, linear warmup then ∝ 1/√step, dropout, w_importance = w_load = 0.1; App. D:
the factored, β1 = 0 Adam for expert parameters (`train.expert_optimizer`), which with sparse
expert gradients touches only the experts that received tokens (so 131072 experts train on a
laptop). Every step is a pure function of (config, step, parameters): batches come by step number,
and the dropout and gate-noise generators are re-seeded from (seed, step) at each step, so a run
resumed from a checkpoint produces exactly the losses of an uninterrupted one.

A non-finite loss stops the run before the optimizer touches the parameters, with the last good
checkpoint kept (`TrainingDiverged`, exit code 3 from the CLI).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from moe_impl import telemetry
from moe_impl.data.synthetic import TopicMarkov
from moe_impl.model import flops
from moe_impl.model.lm import MoELanguageModel
from moe_impl.parallel import checkpointing, global_grad_norm, sum_replicated_grads
from moe_impl.parallel import context as parallel_context
from moe_impl.runs import rundir, runinfo
from moe_impl.train import checkpoint
from moe_impl.train.config import dump, model_config, synthetic_config
from moe_impl.train.optim import FactoredAdam
from moe_impl.train.progress import Progress

STATS = ("cv_importance", "cv_load", "max_over_mean_load")
_STATS_WINDOW = 20  # summary routing statistics: mean over the last this many steps
# the loop's own state, saved in every checkpoint and restored on --resume (with the model and
# optimizer states, and the wall time so far)
_RESUMED = (
    "step", "state", "train_time", "scored_tokens", "expert_load", "snapshots", "recent_stats",
)  # fmt: skip


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run directory keeps the last good checkpoint."""


def build_corpus(cfg: dict):
    data = cfg["data"]
    if data["corpus"] == "synthetic":
        return TopicMarkov(synthetic_config(cfg))
    if data["corpus"] == "lm1b":
        from moe_impl.data.lm1b import LM1BCorpus

        return LM1BCorpus(
            data["path"],
            vocab_file=data["vocab_file"],
            cache_dir=data["cache_dir"],
            seed=cfg["train"]["seed"],
            max_train_shards=data["max_train_shards"],
        )
    from moe_impl.data.text import TextCorpus

    return TextCorpus(data["path"], min_count=data["min_count"], max_vocab=data["max_vocab"])


def lr_factor(step: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak rate at 0-based `step`: linear warmup over `warmup` steps, then
    constant or ∝ 1/√step (App. C.1), continuous at the end of warmup."""
    s = step + 1
    if warmup and s <= warmup:
        return s / warmup
    if schedule == "constant":
        return 1.0
    return math.sqrt(max(warmup, 1) / s)


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The configured device; a bare 'cuda' in a distributed run is the process's own GPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and local_rank is not None:
        raise ValueError(
            f"train.device={name!r} names one GPU, but each process of a distributed run takes "
            "its own (LOCAL_RANK): set train.device=cuda"
        )
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


class Trainer:
    """One training run in `run_dir`, from a resolved config (train_config.load_config)."""

    def __init__(self, cfg: dict, run_dir: str | Path, *, resume: bool = False) -> None:
        self._segment_start = time.perf_counter()  # wall time counts set-up too
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.train_cfg, self.eval_cfg = cfg["train"], cfg["eval"]
        tc = self.train_cfg
        if tc["threads"]:
            torch.set_num_threads(tc["threads"])
        dc = cfg["distributed"]
        self.ctx = parallel_context.setup(
            dc["backend"], torch.device(tc["device"]).type, dc["timeout_s"]
        )
        self.device = resolve_device(
            tc["device"], self.ctx.local_rank if self.ctx.distributed else None
        )
        for key in ("train.batch_size", "eval.batch_size"):
            section, name = key.split(".")
            if cfg[section][name] % self.ctx.world_size:
                raise ValueError(
                    f"{key}={cfg[section][name]} must be divisible by the number of processes "
                    f"({self.ctx.world_size}): each takes an equal share of the rows"
                )
        self.corpus = self._open_corpus(cfg)
        self.model_cfg = model_config(cfg, self.corpus.vocab_size)
        self.name = cfg["name"] or self.model_cfg.name
        torch.manual_seed(tc["seed"])
        m = cfg["model"]
        proposal = None
        if self.model_cfg.softmax_samples and not self.corpus.ids_by_frequency:
            proposal = torch.full((self.corpus.vocab_size,), -math.log(self.corpus.vocab_size))
        self.model = MoELanguageModel(
            self.model_cfg,
            dropout=m["dropout"],
            w_importance=m["w_importance"],
            w_load=m["w_load"],
            noisy_gating=m["noisy_gating"],
            sparse_grad=m["sparse_grad"],
            proposal_log_probs=proposal,
            expert_parallel=self.ctx.distributed,
            replicate_noise=dc["replicate_noise"],
        ).to(self.device)
        self.optimizers = self._optimizers()
        self.generator = torch.Generator(device=self.device)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if tc["dtype"] == "bfloat16"
            else nullcontext()
        )
        self.tokens_per_step = tc["batch_size"] * tc["seq_len"]  # training positions per step
        self.total_steps = self._total_steps()
        self.step, self.state, self.train_time, self.snapshots = 0, None, 0.0, []
        self.scored_tokens = 0
        self.expert_load = None  # tokens per expert summed over the last _STATS_WINDOW steps
        self.recent_stats: list[dict] = []
        self.wall_before = 0.0  # wall time of earlier segments of a resumed run
        # only now, with everything built and checked, touch the run directory
        self._prepare_run_dir(resume)
        if resume and not rundir.is_finished(self.run_dir):  # finished: run() returns its summary
            latest = checkpoint.latest(self.run_dir)
            if latest is not None:
                self._restore(latest)
            elif self.ctx.is_main:  # killed before its first checkpoint: forget what it logged
                (self.run_dir / rundir.METRICS_FILE).unlink(missing_ok=True)
            self.ctx.barrier()

    # --- set-up -----------------------------------------------------------------------------

    def _open_corpus(self, cfg: dict):
        """The corpus; in a distributed run rank 0 opens it first (and writes any cache), then the
        others read it, and a data error stops every rank, not only rank 0."""
        if not self.ctx.distributed:
            return build_corpus(cfg)
        corpus, error = None, None
        if self.ctx.is_main:
            try:
                corpus = build_corpus(cfg)
                if hasattr(corpus, "stream"):  # real text: encode (and cache) what training reads
                    for split in ("train", cfg["eval"]["split"]):
                        corpus.stream(split)
            except ValueError as err:
                error = err
        if not self.ctx.all_agree(error is None, self.device):
            raise error or ValueError("rank 0 could not open the corpus (its error says why)")
        return corpus if corpus is not None else build_corpus(cfg)

    def _prepare_run_dir(self, resume: bool) -> None:
        d = self.run_dir
        config_path = d / rundir.CONFIG_FILE
        # every rank checks before any writes, so all raise alike
        if d.exists() and any(d.iterdir()) and not resume:
            raise ValueError(
                f"run directory {str(d)!r} is not empty; pass --resume to continue it or choose "
                "another --out"
            )
        text = dump(self.cfg)
        if resume and config_path.exists() and config_path.read_text() != text:
            raise ValueError(
                f"--resume: the config differs from the one in {str(config_path)!r}; a resumed "
                "run must use the same settings (compare the files, or start a new --out)"
            )
        self.ctx.barrier()
        if self.ctx.is_main:
            d.mkdir(parents=True, exist_ok=True)
            config_path.write_text(text)
            runinfo.write_run_identity(d, self.name, self.cfg["experiment"])
        self.ctx.barrier()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        tc = self.train_cfg
        experts = [p for n, p in self.model.named_parameters() if ".experts." in n]
        bank = getattr(self.model.moe, "experts", None)
        sparse = bool(getattr(bank, "sparse_grad", False))
        choice = tc["expert_optimizer"]
        if choice == "auto":
            choice = "factored" if sparse else "adam"
        if choice == "adam" and sparse:
            raise ValueError(
                "train.expert_optimizer='adam' cannot take sparse expert gradients; use "
                "'factored' (App. D) or set model.sparse_grad=false"
            )
        self.expert_optimizer = choice if experts else None
        # fused: one kernel for all tensors (CPU and CUDA); 4x faster than the per-tensor loop on
        # our CPU for 256 experts' dense gradients
        adam_kw = dict(lr=tc["lr"], betas=(tc["beta1"], tc["beta2"]), eps=tc["eps"], fused=True)
        if choice == "factored" and experts:
            ids = {id(p) for p in experts}
            rest = [p for p in self.model.parameters() if id(p) not in ids]
            return [
                torch.optim.Adam(rest, **adam_kw),
                FactoredAdam(experts, lr=tc["lr"], beta2=tc["beta2"], eps=tc["eps"]),
            ]
        return [torch.optim.Adam(self.model.parameters(), **adam_kw)]

    def _total_steps(self) -> int:
        tc = self.train_cfg
        if tc["tokens"] is not None:
            return max(1, -(-tc["tokens"] // self.tokens_per_step))
        per_epoch = self.corpus.steps_per_epoch(tc["batch_size"], tc["seq_len"])
        return tc["epochs"] * per_epoch

    # --- checkpoints ------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        # distributed: rank 0 writes the replicated layers, every rank its experts
        model_state, opt_states = checkpointing.local_state(
            self.model, self.optimizers, self.ctx.rank
        )
        checkpoint.save(
            self.run_dir,
            self.step,
            {
                **{name: getattr(self, name) for name in _RESUMED},
                "model": model_state,
                "optimizers": opt_states,
                "wall_time": self.wall_before + time.perf_counter() - self._segment_start,
            },
            keep=self.train_cfg["keep_checkpoints"],
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            barrier=self.ctx.barrier,
        )

    def _restore(self, path: Path) -> None:
        rank, world = self.ctx.rank, self.ctx.world_size
        old_world = checkpoint.world_size_of(path)
        if old_world == world:
            saved = checkpoint.load(path, self.device, rank=rank, world_size=world)
            model_state, opt_states = saved["model"], saved["optimizers"]
            if rank != 0:  # the replicated layers are in rank 0's file
                main = checkpoint.load(path, "cpu", rank=0, world_size=world, mmap=True)
                model_state, opt_states = checkpointing.merged_state(
                    self.model, self.optimizers, main, saved
                )
        else:  # written by another number of processes: reshard (reads every old file)
            old = [
                checkpoint.load(path, "cpu", rank=r, world_size=old_world, mmap=True)
                for r in range(old_world)
            ]
            model_state, opt_states, lstm_state = checkpointing.resharded_state(
                self.model, self.optimizers, old, rank, world
            )
            saved = {**old[0], "state": lstm_state}
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, opt_states, strict=True):
            opt.load_state_dict(state)
            checkpointing.state_to_param_devices(opt)
        for name in _RESUMED:
            setattr(self, name, saved[name])
        if self.state is not None:
            self.state = [tuple(t.to(self.device) for t in s) for s in self.state]
        self.wall_before = saved["wall_time"]
        if not self.ctx.is_main:
            return
        # lines logged after the checkpoint would be logged again: drop them (evaluations at the
        # checkpoint's step too, unless they are snapshots it holds)
        snapshot_steps = {snap["step"] for snap in self.snapshots}
        kept = [
            r
            for r in rundir.read_metrics(self.run_dir)
            if r.get("step", 0) < self.step
            or (
                r.get("step") == self.step and (r["kind"] == "train" or self.step in snapshot_steps)
            )
        ]
        path = self.run_dir / rundir.METRICS_FILE
        path.write_text("".join(rundir.dumps(r) + "\n" for r in kept))

    # --- the loop ---------------------------------------------------------------------------

    def _rows(self, array):
        """This process's share of a batch's rows (all of them on one process)."""
        rows, left = divmod(array.shape[0], self.ctx.world_size)
        if left:  # never drop rows silently (the corpora give full batches; this guards that)
            raise RuntimeError(
                f"a batch of {array.shape[0]} rows cannot be split over {self.ctx.world_size} "
                "processes"
            )
        return array[self.ctx.rank * rows : (self.ctx.rank + 1) * rows]

    def _batch(self, batch):
        def to(a):
            return torch.from_numpy(np.ascontiguousarray(self._rows(a))).to(self.device)

        return to(batch.inputs), to(batch.targets), to(batch.scored)

    def train_step(self) -> dict:
        tc, step, rank = self.train_cfg, self.step, self.ctx.rank
        self.model.train()
        # dropout (and CUDA kernels' RNG), then gate noise and softmax samples: per rank, or, with
        # distributed.replicate_noise, the same draw on every rank (each keeps its rows)
        torch.manual_seed(_step_seed(tc["seed"], step, 1 + 2 * rank))
        noise_salt = 2 if self.cfg["distributed"]["replicate_noise"] else 2 + 2 * rank
        self.generator.manual_seed(_step_seed(tc["seed"], step, noise_salt))
        inputs, targets, scored = self._batch(
            self.corpus.train_batch(step, tc["batch_size"], tc["seq_len"])
        )
        state = self.state if self.corpus.carries_state else None
        with self.autocast:
            out = self.model(inputs, targets, scored, state=state, generator=self.generator)
        # this rank's share of the global mean NLL (sync.py's convention), and the global mean
        nll_sum, num_scored = self.ctx.sum(
            [float(out.nll_sum.detach().float()), float(out.num_scored)], self.device
        )
        num_scored = max(num_scored, 1.0)
        share = out.nll_sum.float() / num_scored
        loss, aux = nll_sum / num_scored, float(out.aux_loss.detach())
        if not math.isfinite(loss + aux):
            raise TrainingDiverged(
                f"step {step}: the loss is {loss + aux} (nll {loss}, aux {aux}); stopped before "
                f"updating. The last good checkpoint is {checkpoint.latest(self.run_dir)}; start "
                "a new run (--out) with a lower train.lr or a train.clip_norm"
            )
        (share + out.aux_loss.float()).backward()
        grad_norm = self._clip()
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"step {step}: the gradient norm is {grad_norm} (loss {loss}); stopped "
                f"before updating. The last good checkpoint is {checkpoint.latest(self.run_dir)}; "
                "start a new run (--out) with a lower train.lr or a train.clip_norm"
            )
        factor = lr_factor(step, tc["warmup_steps"], tc["schedule"])
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = tc["lr"] * factor
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.corpus.carries_state:
            self.state = [tuple(t.detach() for t in s) for s in out.state]
        record = {
            "kind": "train",
            "step": step + 1,
            "tokens": (step + 1) * self.tokens_per_step,
            "loss": loss,
            "aux_loss": aux,
            "lr": tc["lr"] * factor,
            "grad_norm": grad_norm,
            "scored_tokens": int(num_scored),
        }
        if out.stats is not None:
            for key in STATS:
                record[key] = float(getattr(out.stats, key))
            record["num_dropped"] = int(out.stats.num_dropped)
            if step >= self.total_steps - _STATS_WINDOW:  # the per-expert load histogram
                counts = out.stats.tokens_per_expert.cpu().numpy().astype(np.int64)
                self.expert_load = counts if self.expert_load is None else self.expert_load + counts
        return record

    def _clip(self) -> float:
        """Global gradient norm over dense and sparse gradients (a sparse gradient's values hold
        each active expert once); scales all gradients down to train.clip_norm. Distributed: the
        replicated gradients are summed over ranks first, the norm covers every rank's experts."""
        if self.ctx.distributed:
            sum_replicated_grads(self.model)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.ctx.distributed:
            norm = global_grad_norm(self.model)
        else:
            norms = [torch.linalg.vector_norm(g._values() if g.is_sparse else g) for g in grads]
            norm = float(torch.linalg.vector_norm(torch.stack(norms).float())) if norms else 0.0
        clip = self.train_cfg["clip_norm"]
        if clip is not None and math.isfinite(norm) and norm > clip:
            for g in grads:
                g.mul_(clip / norm)
        return norm

    @torch.no_grad()
    def evaluate(self, split: str | None = None) -> dict:
        """Mean NLL per scored token of the split (full softmax, no dropout or noise)."""
        ec = self.eval_cfg
        split = split or ec["split"]
        self.model.eval()
        nll, oracle, count, state = 0.0, 0.0, 0, None
        has_oracle = True
        for batch in self.corpus.eval_batches(split, ec["batch_size"], ec["seq_len"], ec["tokens"]):
            inputs, targets, scored = self._batch(batch)
            with self.autocast:
                out = self.model(inputs, targets, scored, state=state)
            state = out.state
            nll += float(out.nll_sum)
            count += int(out.num_scored)
            if batch.oracle_logp is None:
                has_oracle = False
            else:
                oracle -= float(self._rows(batch.oracle_logp)[self._rows(batch.scored)].sum())
        self.model.train()
        nll, count, oracle = self.ctx.sum([nll, count, oracle], self.device)
        count = int(count)
        if count == 0:
            raise ValueError(f"the {split} split has no scored tokens")
        mean = nll / count
        return {
            "split": split,
            "nll": mean,
            "perplexity": math.exp(mean),
            "excess_nll": mean - oracle / count if has_oracle else None,
            "oracle_nll": oracle / count if has_oracle else None,
            "scored_tokens": count,
        }

    def run(self) -> dict:
        """Train to the budget (or on from the checkpoint), evaluate, write summary.json."""
        if rundir.is_finished(self.run_dir):
            return rundir.read_summary(self.run_dir)
        self.peak_flops, self.peak_flops_source = telemetry.resolve_peak_flops(
            str(self.device),
            self.train_cfg["dtype"],
            device_name=self._device_name(),
            override=self.cfg["telemetry"]["peak_flops"],
        )
        tracker = self._start_tracking()
        sampler = None
        if self.device.type == "cuda" and self.ctx.is_main:
            index = self.device.index if self.device.index is not None else 0
            sampler = telemetry.GpuSampler(self.cfg["telemetry"]["interval_s"], index).start()
        try:
            summary = self._run(tracker, sampler)
        except BaseException as err:
            if tracker is not None:
                tracker.fail("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if sampler is not None:
                sampler.stop()
        if tracker is not None:
            tracker.finish(summary)
        return summary

    def _start_tracking(self):
        tr = self.cfg["tracking"]
        if not tr["enabled"] or not self.ctx.is_main:  # rank 0 alone logs to MLflow
            return None
        from moe_impl.tracking import RunTracker  # mlflow is imported only in moe_impl.tracking

        return RunTracker.start(
            self.run_dir,
            config=self.cfg,
            experiment=self.cfg["experiment"],
            run_name=self.name,
            tags={
                "preset": self.cfg["model"]["preset"],
                "corpus": self.cfg["data"]["corpus"],
                "device_name": self._device_name(),
                "peak_flops_source": self.peak_flops_source,
                "sweep": self.cfg["sweep"] or "",
            },
            tracking_uri=tr["uri"],
        )

    def _run(self, tracker, sampler) -> dict:
        tc, per_step = self.train_cfg, self.tokens_per_step
        # a snapshot at the last step is the final evaluation: not run twice
        snapshot_steps = {-(-t // per_step) for t in self.eval_cfg["at_tokens"]}
        snapshot_steps.discard(self.total_steps)
        done = {s["step"] for s in self.snapshots}
        main = self.ctx.is_main
        progress = Progress(
            tc["progress"] if main else "none", self.total_steps, self.step, self.name,
            every=tc["log_every"],
        )  # fmt: skip
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                record = self.train_step()
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.step += 1
                record["tokens_per_second"] = per_step / dt
                record["time"] = self.train_time
                self.scored_tokens += record["scored_tokens"]
                if "cv_importance" in record:
                    self.recent_stats = [*self.recent_stats, {k: record[k] for k in STATS}][
                        -_STATS_WINDOW:
                    ]
                logged = self.step % tc["log_every"] == 0 or self.step == self.total_steps
                if sampler is not None and logged:
                    record.update(sampler.latest())
                if main:  # every step; MLflow every log_every
                    rundir.append_metrics(self.run_dir, record)
                if tracker is not None and logged:
                    tracker.log_record(record)
                progress.update(self.step, record)
                if self.step in snapshot_steps and self.step not in done:
                    self._log(tracker, self._snapshot())
                if self.step % tc["checkpoint_every"] == 0 or self.step == self.total_steps:
                    if tracker is not None:
                        tracker.flush()  # what MLflow has then covers the checkpoint
                    self._checkpoint()
        finally:
            progress.close()
        final = self.evaluate()
        self._log(
            tracker, {"kind": "eval", "step": self.step, "tokens": self.step * per_step, **final}
        )
        summary = self._summary(final, self.wall_before + time.perf_counter() - self._segment_start)
        if sampler is not None:
            summary.update(sampler.summary())
            summary.update({f"gpu_{k}": v for k, v in sampler.info.items()})
        if not main:
            return summary
        if self.expert_load is not None:
            rundir.write_json(
                self.run_dir / rundir.EXPERT_LOAD_FILE,
                {
                    "steps": min(_STATS_WINDOW, self.total_steps),
                    "tokens_per_expert": self.expert_load.tolist(),
                },
            )
        rundir.write_json(self.run_dir / rundir.SUMMARY_FILE, summary)
        return summary

    def _log(self, tracker, record: dict) -> None:
        if not self.ctx.is_main:
            return
        rundir.append_metrics(self.run_dir, record)
        if tracker is not None:
            tracker.log_record(record)

    def _snapshot(self) -> dict:
        result = self.evaluate()
        tokens = self.step * self.tokens_per_step
        self.snapshots.append({"step": self.step, "tokens": tokens, **result})
        return {"kind": "eval", "step": self.step, "tokens": tokens, **result}

    def _summary(self, final: dict, wall: float) -> dict:
        cfg, tc, per_step = self.model_cfg, self.train_cfg, self.tokens_per_step
        tokens_per_second = self.step * per_step / self.train_time if self.train_time else None
        train_flops = flops.train_flops_per_token(cfg)
        world = self.ctx.world_size
        tflops = train_flops * tokens_per_second / 1e12 / world if tokens_per_second else None
        stats = {
            k: float(np.mean([s[k] for s in self.recent_stats])) if self.recent_stats else None
            for k in STATS
        }
        floor = self.corpus.floor_nats()
        return {
            "name": self.name,
            "preset": self.cfg["model"]["preset"],
            "corpus": self.corpus.describe(),
            "test_perplexity": final["perplexity"],
            "test_nll": final["nll"],
            "excess_nll": final["excess_nll"],
            "oracle_nll": final["oracle_nll"],
            "floor_nll": floor,
            "floor_perplexity": math.exp(floor) if floor is not None else None,
            "eval_split": final["split"],
            "eval_scored_tokens": final["scored_tokens"],
            "params_total": flops.total_params(cfg),
            "params_excl_embedding_softmax": flops.params_excl_embedding_softmax(cfg),
            "ops_per_timestep": flops.ops_per_timestep(cfg),
            "train_flops_per_token": train_flops,
            "tflops_per_device": tflops,
            "mfu": telemetry.mfu(tflops, self.peak_flops),
            "peak_flops": self.peak_flops,
            "peak_flops_source": self.peak_flops_source,
            "tokens_per_second": tokens_per_second,
            **stats,
            "peak_memory_mb": self.ctx.max(self._peak_memory_mb(), self.device),  # over ranks
            "wall_time_s": wall,
            "train_time_s": self.train_time,
            "train_tokens": self.step * per_step,
            "train_scored_tokens": self.scored_tokens,
            "steps": self.step,
            "snapshots": self.snapshots,
            "expert_optimizer": self.expert_optimizer,
            "device": str(self.device),
            "world_size": world,
            "backend": self.ctx.backend,
            "device_name": self._device_name(),
            "dtype": tc["dtype"],
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "python": sys.version.split()[0],
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def _device_name(self) -> str:
        name = runinfo.device_name(str(self.device))
        return name if self.device.type == "cuda" else f"{name} ({os.cpu_count()} cores)"
