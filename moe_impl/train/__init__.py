"""Training one model on one corpus, into a run directory (moe_impl.runs) and, optionally, MLflow.

config (the typed run config) -> loop (the `Trainer`: step, evaluate, run), which uses corpus (the
corpus and this process's rows), device, optim (optimizers, clipping, FactoredAdam), schedule
(steps, learning rate, seeds), state (the loop state, checkpoints of the run: checkpoint.py writes
the files), summary (summary.json), monitor (MLflow, GPU sampling) and progress (the console)."""
