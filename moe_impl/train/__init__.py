"""Training one model on one corpus: config (the typed run config), loop (the `Trainer`), optim,
checkpoint, progress. Writes the run directory (moe_impl.runs) and, optionally, MLflow."""
