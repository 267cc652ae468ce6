"""The training loop of `python -m moe_impl train`: config -> run directory (moe_impl/runs/rundir.py).

Paper App. C.1: Adam, linear warmup then ∝ 1/√step, dropout, w_importance = w_load = 0.1; App. D:
the factored, β1 = 0 Adam for expert parameters (`train.expert_optimizer`, optim.py), which with
sparse expert gradients touches only the experts that received tokens (so 131072 experts train on
a laptop). Every step is a pure function of (config, step, parameters): batches come by step
number, and the generators are re-seeded from (seed, step) (schedule.py), so a run resumed from a
checkpoint (state.py) produces exactly the losses of an uninterrupted one.

A non-finite loss stops the run before the optimizer touches the parameters, with the last good
checkpoint kept (`TrainingDiverged`, exit code 3 from the CLI). An evaluation whose perplexity is
not finite (NaN, or an NLL so large that exp() overflows) also ends the run as diverged, the final
one or a snapshot (the run stops at that snapshot), but with a summary.json that gives the reason
under `diverged`, so that the run is finished and every `--resume` answers the same line and
exit code 3 (analysis collect leaves such runs out). SIGTERM, SIGINT or SIGHUP stops the run
after the step it is in, with a checkpoint at that step (`TrainingInterrupted`, interrupt.py; exit
code 143, 130 or 129 from the CLI); expert-parallel processes agree on the step in the step's loss
all-reduce, so all stop at the same one.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy as np
import torch

from moe_impl import runtime, telemetry
from moe_impl.layer.compiled import compile_routing
from moe_impl.model.lm import MoELanguageModel
from moe_impl.parallel import context as parallel_context
from moe_impl.runs import expertstats, lock, rundir, runinfo
from moe_impl.train import checkpoint, micro, processes
from moe_impl.train.card import run_card
from moe_impl.train.config import RunConfig
from moe_impl.train.corpus import local_batch, local_rows, open_corpus
from moe_impl.train.device import autocast, device_name, peak_memory_mb, resolve_device
from moe_impl.train.interrupt import StopSignals, TrainingInterrupted
from moe_impl.train.monitor import start_sampler, start_tracker
from moe_impl.train.optim import build_optimizers, clip_gradients
from moe_impl.train.prefetch import TrainBatches, resolve_workers
from moe_impl.train.progress import Progress
from moe_impl.train.schedule import lr_factor, step_seeds, total_steps
from moe_impl.train.state import (
    STATS,
    STATS_WINDOW,
    LoopState,
    prepare_run_dir,
    resumed_state,
    save_checkpoint,
)
from moe_impl.train.summary import build_summary, perplexity, write_summary


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (the run directory keeps the last good checkpoint), or an
    evaluation's perplexity did (summary.json then says so: `diverged_message`)."""


def evaluation_divergence(record: dict, which: str) -> str | None:
    """Why an evaluation record (`which`: "final" or "snapshot") says the run diverged, in words
    (summary.json's `diverged`); None when its perplexity is finite."""
    if math.isfinite(record["perplexity"]):
        return None
    return (
        f"the {which} evaluation at step {record['step']} has a {record['split']} NLL of "
        f"{record['nll']:.4g} nats per token (perplexity {record['perplexity']})"
    )


def diverged_message(reason) -> str:
    """TrainingDiverged's line for a run whose evaluation diverged (`reason`: summary.json's
    `diverged`), the same when the run ends and on every --resume of it."""
    if not isinstance(reason, str):
        reason = "an evaluation's perplexity is not finite"
    return (
        f'the run diverged: {reason}; summary.json records it under "diverged" (the run is '
        "finished, --resume ends here again); start a new run (--out) with a lower train.lr or "
        "a train.clip_norm"
    )


class Trainer:
    """One training run in `run_dir`, from a RunConfig (config.load_config)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        replace_changed: bool = False,
    ) -> None:
        """`resume`: continue the run in run_dir (same config values); `replace_changed`: with
        resume, set a run with other values aside and start a new one (state.prepare_run_dir)."""
        self._segment_start = time.perf_counter()  # wall time counts set-up too
        self.cfg, self.run_dir = cfg, Path(run_dir)
        train = cfg.train
        if train.threads:
            runtime.check_threads("train.threads", train.threads)  # before a thread starts
            torch.set_num_threads(train.threads)
        runtime.check_threads("train.prefetch_workers", train.prefetch_workers)
        self.ctx = parallel_context.setup(
            cfg.distributed.backend, torch.device(train.device).type, cfg.distributed.timeout_s
        )
        self.device = resolve_device(
            train.device, self.ctx.local_rank if self.ctx.distributed else None
        )
        if self.device.type == "cpu":
            runtime.flush_denormals()  # the load loss's CDF gradient underflows (runtime.py)
        batches = {"train.batch_size": train.batch_size, "eval.batch_size": cfg.eval.batch_size}
        world = self.ctx.world_size
        processes.check_divisible(batches, world, f"the number of processes ({world})")
        micro.check_micro_batches(train.batch_size, train.micro_batches, self.ctx.world_size)
        self.corpus = open_corpus(cfg, self.ctx, self.device)
        self.model_cfg = cfg.model.resolve(self.corpus.vocab_size)
        self.name = cfg.name or self.model_cfg.name
        torch.manual_seed(train.seed)
        proposal = None
        if self.model_cfg.softmax_samples and not self.corpus.ids_by_frequency:
            proposal = torch.full((self.corpus.vocab_size,), -math.log(self.corpus.vocab_size))
        self.model = MoELanguageModel(
            self.model_cfg,
            proposal_log_probs=proposal,
            expert_parallel=self.ctx.distributed,
            replicate_noise=cfg.distributed.replicate_noise,
        ).to(self.device)
        if cfg.model.compile:  # the gates' routing and the combine (layer/compiled.py)
            compile_routing(self.model)
        self.optimizers, self.expert_optimizer = build_optimizers(self.model, train)
        self.generator = torch.Generator(device=self.device)
        self.autocast = autocast(self.device, train.dtype)
        self.tokens_per_step = train.tokens_per_step
        self.total_steps = total_steps(train, self.corpus)
        # the batches by step: inline, or made ahead by worker processes while run trains
        workers = resolve_workers(train.prefetch_workers, self.corpus.name, self.device.type)
        self.batches = TrainBatches(
            self.corpus,
            train.batch_size,
            train.seq_len,
            workers=workers,
            pin=self.device.type == "cuda",
        )
        self.loop = LoopState()
        self._stop, self._stop_agreed = StopSignals(), False  # SIGTERM / SIGINT (interrupt.py)
        # only now, with everything built and checked, touch the run directory
        # what the run is, in words (MLflow's run name, description, dataset): rank 0 writes it
        card = run_card(cfg, self.model_cfg, self.corpus.describe()) if self.ctx.is_main else None
        prepare_run_dir(
            self.run_dir,
            cfg,
            resume=resume,
            ctx=self.ctx,
            name=self.name,
            experiment=cfg.experiment,
            replace_changed=replace_changed,
            card=card,
        )
        if resume and not rundir.is_finished(self.run_dir):  # finished: run() returns its summary
            self.loop = resumed_state(
                self.run_dir, self.model, self.optimizers, self.ctx, self.device, cfg=cfg
            )

    @property
    def step(self) -> int:
        """Training steps done."""
        return self.loop.step

    # --- one step, one evaluation -----------------------------------------------------------

    def train_step(self) -> dict:
        """Train step `self.step` (the loop state advances in run): its metrics record."""
        train, step = self.cfg.train, self.loop.step
        self.model.train()
        dropout_seed, noise_seed = step_seeds(
            train.seed, step, self.ctx.rank, self.cfg.distributed.replicate_noise
        )
        torch.manual_seed(dropout_seed)
        self.generator.manual_seed(noise_seed)
        batch = self.batches.get(step)  # corpus.train_batch(step, ...), made ahead or now
        inputs, targets, scored = local_batch(batch, self.ctx, self.device, pin=self.batches.pin)
        loss, aux, num_scored, stats, state = self._forward_backward(inputs, targets, scored)
        grad_norm = clip_gradients(self.model, train.clip_norm, distributed=self.ctx.distributed)
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm} (loss {loss})")
        factor = lr_factor(step, train.warmup_steps, train.schedule)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = train.lr * factor
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.corpus.carries_state:
            self.loop.lstm_state = state
        record = {
            "kind": "train",
            "step": step + 1,
            "tokens": (step + 1) * self.tokens_per_step,
            "loss": loss,
            "aux_loss": aux,
            "lr": train.lr * factor,
            "grad_norm": grad_norm,
            "scored_tokens": int(num_scored),
        }
        if stats is not None:
            for key in STATS:
                record[key] = float(getattr(stats, key))
            record["num_dropped"] = int(stats.num_dropped)
            counts = stats.tokens_per_expert.cpu().numpy().astype(np.int64)
            if step >= self.total_steps - STATS_WINDOW:  # the per-expert load histogram
                load = self.loop.expert_load
                self.loop.expert_load = counts if load is None else load + counts
            self._tally(step + 1, counts, stats)
        return record

    def _tally(self, step: int, counts: np.ndarray, stats) -> None:
        """Count step `step` (1-based) into the per-expert statistics (runs/expertstats.py): its
        slots per expert, Importance (Eq. 6; Eq. 13 when hierarchical) and mean gate entropies
        (RoutingStats). Recording only: nothing here feeds back into the training."""
        tally = self.loop.expert_tally
        if tally is None:
            groups = self.model_cfg.num_groups if self.model_cfg.moe == "hierarchical" else None
            tally = self.loop.expert_tally = expertstats.ExpertTally.new(counts.size, groups)
        entropy = [getattr(stats, name) for name in expertstats.ENTROPIES]
        tally.add(
            step,
            counts,
            stats.importance.detach().double().cpu().numpy(),
            tuple(None if h is None else float(h) for h in entropy),
        )

    def _forward_backward(self, inputs, targets, scored) -> tuple:
        """Forward and backward of the step's rows in train.micro_batches micro-batches, gradients
        summed (micro.py gives the rules): (mean NLL, aux loss, scored tokens of every rank,
        routing stats, the LSTM state after the rows or None). A non-finite loss stops the run
        here, before clipping and the optimizer."""
        m, carries = self.cfg.train.micro_batches, self.corpus.carries_state
        # the step's scored tokens, every rank's, known before any forward: each micro-batch's
        # NLL sum is divided by them, so each rank's loss is its share of the step's mean NLL
        # (sync.py's convention) and the summed gradients are the unsplit step's
        (num_scored,) = self.ctx.sum([float(scored.sum())], self.device)
        num_scored = max(num_scored, 1.0)
        states = micro.split_state(self.loop.lstm_state if carries else None, m)
        batches = micro.split_rows((inputs, targets, scored), m)
        nll_sum, aux, stats, new_states = 0.0, 0.0, [], []
        for (x, y, mask), state in zip(batches, states, strict=True):
            with self.autocast:
                out = self.model(x, y, mask, state=state, generator=self.generator)
            # Eq. 6-11 over this micro-batch; the step's balancing loss is their mean (micro.py)
            (out.nll_sum.float() / num_scored + out.aux_loss.float() / m).backward()
            if m > 1:  # after every pass: CUDA's sparse add concatenates (micro.py)
                micro.coalesce_sparse_grads(self.model)
            nll_sum += float(out.nll_sum.detach().float())
            aux += float(out.aux_loss.detach()) / m
            stats.append(out.stats)
            if carries:
                new_states.append(out.state)
        # the step's mean NLL; the same all-reduce tells every rank whether any caught a stop
        # signal (_stop_requested)
        nll_sum, stops = self.ctx.sum([nll_sum, float(self._stop.requested)], self.device)
        self._stop_agreed = stops > 0
        loss = nll_sum / num_scored
        if not math.isfinite(loss + aux):
            self._diverged(f"the loss is {loss + aux} (nll {loss}, aux {aux})")
        state = micro.join_state(new_states) if carries else None
        return loss, aux, num_scored, micro.combine_stats(stats), state

    def _diverged(self, what: str) -> None:
        raise TrainingDiverged(
            f"step {self.loop.step}: {what}; stopped before updating. The last good checkpoint is "
            f"{checkpoint.latest(self.run_dir)}; start a new run (--out) with a lower train.lr or "
            "a train.clip_norm"
        )

    @torch.no_grad()
    def evaluate(self, split: str | None = None) -> dict:
        """Mean NLL per scored token of the split (full softmax, no dropout or noise)."""
        evaluation, ctx = self.cfg.eval, self.ctx
        split = split or evaluation.split
        self.model.eval()
        nll, oracle, count, state = 0.0, 0.0, 0, None
        has_oracle = True
        batches = self.corpus.eval_batches(
            split, evaluation.batch_size, evaluation.seq_len, evaluation.tokens
        )
        for batch in batches:
            inputs, targets, scored = local_batch(batch, self.ctx, self.device)
            with self.autocast:
                out = self.model(inputs, targets, scored, state=state)
            state = out.state
            nll += float(out.nll_sum)
            count += int(out.num_scored)
            if batch.oracle_logp is None:
                has_oracle = False
            else:
                oracle -= float(
                    local_rows(batch.oracle_logp, ctx)[local_rows(batch.scored, ctx)].sum()
                )
        self.model.train()
        nll, summed_count, oracle = self.ctx.sum([nll, count, oracle], self.device)
        count = int(summed_count)
        if count == 0:
            raise ValueError(f"the {split} split has no scored tokens")
        mean = nll / count
        return {
            "split": split,
            "nll": mean,
            "perplexity": perplexity(mean),  # inf where exp overflows (a diverged model)
            "excess_nll": mean - oracle / count if has_oracle else None,
            "oracle_nll": oracle / count if has_oracle else None,
            "scored_tokens": count,
        }

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to the budget (or on from the checkpoint), evaluate, write summary.json.

        SIGTERM / SIGINT (main thread): the step in progress finishes, a checkpoint is written at
        it and TrainingInterrupted is raised (a second signal raises it at once); the previous
        handlers are back when run returns. A signal that comes after the last step was checked
        lets the run finish (final evaluation, summary.json, MLflow): its checkpoint is written.
        """
        with StopSignals() as self._stop:
            try:
                return self._run_tracked()
            except TrainingInterrupted as err:
                if err.step is None:  # a second signal, raised wherever the process was
                    err.step, err.run_dir = self.loop.step, self.run_dir
                raise

    def _run_tracked(self) -> dict:
        if rundir.is_finished(self.run_dir):
            lock.release(self.run_dir)
            summary = rundir.read_summary(self.run_dir)
            assert summary is not None  # a finished run has its summary
            if summary.get("diverged"):  # finished as diverged: the same answer every time
                raise TrainingDiverged(diverged_message(summary["diverged"]))
            return summary
        self.peak_flops, self.peak_flops_source = telemetry.resolve_peak_flops(
            str(self.device),
            self.cfg.train.dtype,
            device_name=device_name(self.device),
            override=self.cfg.telemetry.peak_flops,
        )
        tags = {
            "device_name": device_name(self.device),
            "peak_flops_source": self.peak_flops_source,
        }
        tracker = start_tracker(self.cfg, self.run_dir, self.name, tags, is_main=self.ctx.is_main)
        sampler = start_sampler(self.cfg, self.device, is_main=self.ctx.is_main)
        try:
            summary = self._run(tracker, sampler)
        except BaseException as err:
            if tracker is not None:
                tracker.fail("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if sampler is not None:
                sampler.stop()
            lock.release(self.run_dir)  # taken in prepare_run_dir (runs/lock.py)
        if tracker is not None:
            tracker.finish(summary)
        return summary

    def _run(self, tracker, sampler) -> dict:
        diverged = self._train(tracker, sampler)
        if diverged is None:
            final = self.evaluate()
            tokens = self.loop.step * self.tokens_per_step
            record = {"kind": "eval", "step": self.loop.step, "tokens": tokens, **final}
            self._log(tracker, record)
            diverged = evaluation_divergence(record, "final")
        else:  # the diverged snapshot is the run's last evaluation
            final = self.loop.snapshots[-1]
        summary = self._summary(final, sampler, diverged)
        if self.ctx.is_main:
            write_summary(self.run_dir, summary, self.loop, self.total_steps)
        if diverged is not None:  # after summary.json: the run is finished, as diverged
            raise TrainingDiverged(diverged_message(diverged))
        return summary

    def _train(self, tracker, sampler) -> str | None:
        """Train to the budget, with snapshots and checkpoints; why a snapshot diverged (the run
        stops at it, before that step's checkpoint), else None."""
        train, loop, per_step = self.cfg.train, self.loop, self.tokens_per_step
        # a snapshot at the last step is the final evaluation: not run twice
        snapshot_steps = {-(-t // per_step) for t in self.cfg.eval.at_tokens}
        snapshot_steps.discard(self.total_steps)
        done = {s["step"] for s in loop.snapshots}
        main = self.ctx.is_main
        progress = Progress(
            train.progress if main else "none",
            self.total_steps,
            loop.step,
            self.name,
            every=train.log_every,
        )
        self.batches.start(loop.step, self.total_steps)  # the workers, if any (closed below)
        try:
            while loop.step < self.total_steps:
                t0 = time.perf_counter()
                record = self.train_step()
                dt = time.perf_counter() - t0
                record["input_wait_s"] = self.batches.wait_s  # part of dt: tokens/s includes it
                loop.advance(record, dt)
                record["tokens_per_second"] = per_step / dt
                record["time"] = loop.train_time
                logged = runinfo.tracked_step(loop.step, train.log_every, self.total_steps)
                if logged and loop.expert_tally is not None:  # MaxVio, dead experts, top-20%
                    record.update(self._expert_record())
                if sampler is not None and logged:
                    record.update(sampler.latest())
                if main:  # every step; MLflow every log_every
                    rundir.append_metrics(self.run_dir, record)
                if tracker is not None and logged:
                    tracker.log_record(record)
                progress.update(loop.step, record)
                if loop.step in snapshot_steps and loop.step not in done:
                    snapshot = self._snapshot()
                    self._log(tracker, snapshot)
                    diverged = evaluation_divergence(snapshot, "snapshot")
                    if diverged is not None:  # no checkpoint holds it: a resume evaluates again
                        return diverged
                stop = self._stop_requested()
                if stop or loop.step % train.checkpoint_every == 0 or loop.step == self.total_steps:
                    if tracker is not None:
                        tracker.flush()  # what MLflow has then covers the checkpoint
                    save_checkpoint(
                        self.run_dir,
                        loop,
                        self._wall_time(),
                        self.model,
                        self.optimizers,
                        self.ctx,
                        keep=train.keep_checkpoints,
                        config=self.cfg.to_dict(),
                    )
                if stop:  # the tracker ends the MLflow run as KILLED (run)
                    raise TrainingInterrupted(
                        self._stop.signum or signal.SIGTERM,
                        loop.step,
                        self.run_dir,
                        checkpoint.latest(self.run_dir),
                    )
        finally:
            self.batches.close()  # every worker ended and reaped, whatever ended the loop
            progress.close()
        return None

    def _expert_record(self) -> dict:
        """Close the expert statistics' record at this step (rank 0 writes its files): its
        balance metrics, for the step's metrics record."""
        assert self.loop.expert_tally is not None  # the caller checks
        return expertstats.record(
            self.run_dir if self.ctx.is_main else None,
            self.loop.expert_tally,
            self.loop.step,
            self.total_steps,
            self.cfg.train.dead_expert_window,
        )

    def _summary(self, final: dict, sampler, diverged: str | None) -> dict:
        """summary.json's contents for the final evaluation `final`: build_summary's RunSummary,
        then the GPU telemetry's keys where a sampler ran."""
        summary = build_summary(
            name=self.name,
            preset=self.cfg.model.preset,
            sweep=self.cfg.sweep,
            corpus=self.corpus,
            evaluation=self.cfg.eval,
            model=self.model_cfg,
            final=final,
            loop=self.loop,
            tokens_per_step=self.tokens_per_step,
            wall_time=self._wall_time(),
            peak_flops=self.peak_flops,
            peak_flops_source=self.peak_flops_source,
            peak_memory_mb=self.ctx.max(peak_memory_mb(self.device), self.device),  # over ranks
            expert_optimizer=self.expert_optimizer,
            device=self.device,
            world_size=self.ctx.world_size,
            backend=self.ctx.backend,
            dtype=self.cfg.train.dtype,
            diverged=diverged,
            prefetch_workers=self.batches.workers,
        ).to_dict()
        if sampler is not None:
            summary.update(sampler.summary())
            summary.update({f"gpu_{k}": v for k, v in sampler.info.items()})
        return summary

    def _stop_requested(self) -> bool:
        """After a step: whether a SIGTERM / SIGINT asks the run to stop. Expert-parallel, whether
        any process had caught one at the step's loss all-reduce (train_step), so that all stop
        at the same step and write its checkpoint together; a process signalled later stops
        after the next step."""
        if self.ctx.distributed:
            return self._stop_agreed
        return self._stop.requested

    def _wall_time(self) -> float:
        """Wall time of the whole run so far: earlier segments (before a resume) and this one."""
        return self.loop.earlier_wall_time + time.perf_counter() - self._segment_start

    def _log(self, tracker, record: dict) -> None:
        if not self.ctx.is_main:
            return
        rundir.append_metrics(self.run_dir, record)
        if tracker is not None:
            tracker.log_record(record)

    def _snapshot(self) -> dict:
        result = self.evaluate()
        tokens = self.loop.step * self.tokens_per_step
        self.loop.snapshots.append({"step": self.loop.step, "tokens": tokens, **result})
        return {"kind": "eval", "step": self.loop.step, "tokens": tokens, **result}
