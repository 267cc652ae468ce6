"""`python -m moe_impl gpu-check`: one command that proves the CUDA path on one GPU and measures it.

Each section (environment, exactness, kernels, scale, layer speed, LM step, trainer, NCCL, the
one-GPU reproduction's cost) runs on its own: one that fails is reported with its error and the
others still run. The report (report.py) is rewritten after every section, so an interrupted check
still leaves what it measured. `--device cpu --quick` runs the same sections at toy size, which is
how the test suite exercises this code on machines without a GPU.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs are read and commands run here
