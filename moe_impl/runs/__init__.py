"""The run directory, source of truth for everything downstream: its files (rundir) and the
run's identity and environment (runinfo); and which runs a workflow config has (sweeps).
Torch-free and MLflow-free."""
