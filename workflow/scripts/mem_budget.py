"""The workflow's memory budget on this machine, in MB (Snakemake's mem_mb): the memory available
now (MemAvailable of /proc/meminfo) less a reserve for the rest of the system, max(1 GB, 5% of
the total). `make reproduce` passes it as `snakemake --resources mem_mb=...`, so the jobs
Snakemake starts together never add up to more than the machine has free; each job's mem_mb is
its measured peak with a margin (workflow/resources/peak_memory.yaml).

    python workflow/scripts/mem_budget.py            # prints e.g. 23450

Standard library only (it runs before anything is installed); psutil where there is no
/proc/meminfo (macOS)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

KB = 1024  # /proc/meminfo's "kB" are KiB
RESERVE_MIN_MB = 1000
RESERVE_FRACTION = 0.05


def budget_mb(available_bytes: int, total_bytes: int) -> int:
    """The MB that jobs may use together: what is available less the reserve."""
    reserve = max(RESERVE_MIN_MB, RESERVE_FRACTION * total_bytes / 1e6)
    return max(0, int(available_bytes / 1e6 - reserve))


def budget_from_meminfo(text: str) -> int:
    """budget_mb from the text of /proc/meminfo."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB$", text, re.M))
    missing = [key for key in ("MemTotal", "MemAvailable") if key not in fields]
    if missing:
        raise ValueError(f"/proc/meminfo has no {' or '.join(missing)} line")
    return budget_mb(int(fields["MemAvailable"]) * KB, int(fields["MemTotal"]) * KB)


def machine_budget_mb() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        return budget_from_meminfo(meminfo.read_text())
    import psutil  # a dependency of snakemake

    memory = psutil.virtual_memory()
    return budget_mb(memory.available, memory.total)


if __name__ == "__main__":
    try:
        print(machine_budget_mb())
    except (OSError, ValueError, ImportError) as err:
        sys.exit(f"mem_budget: cannot read this machine's free memory ({err}); pass MEM_MB=...")
