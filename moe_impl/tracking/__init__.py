"""MLflow around the run directories: the store, the live run, import and export."""
