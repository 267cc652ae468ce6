"""The package's architecture as a contract, read from the source with `ast` (nothing is imported):

    layer  <-  parallel  <-  model  <-  train  <-  cli  <-  __main__
    data, runs  <-  train;   runs  <-  telemetry, tracking  <-  train;   layer  <-  runs
    bench (beside train): layer, parallel, model, telemetry, runs
    gpucheck (above train and bench, below cli): the GPU check's sections

Every `moe_impl.*` import (absolute, relative, or a module named in a string such as the lazy
re-exports and the CLI's command table) must follow `ALLOWED`. A second check imports the
torch-free modules, the workflow's imports among them, in a fresh interpreter and asserts that
torch (and, where promised, matplotlib or mlflow) stays unloaded.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_impl"

# component -> the components it may import. A component is a subpackage of moe_impl or one of its
# top-level modules ("moe_impl" stands for moe_impl/__init__.py and its lazy re-exports).
ALLOWED: dict[str, set[str]] = {
    # leaves: pure math, corpora, the run directory, process settings
    "layer": set(),
    "data": set(),
    "runs": {"layer"},  # resources.py reads the layer's sparse-gradient threshold (torch-free)
    "runtime": set(),
    # beside the layers: expert parallelism, hardware telemetry, MLflow
    "parallel": {"layer"},
    "telemetry": {"runs"},
    "tracking": {"runs"},
    # the language models, then training them, and the layer benchmark beside training
    "model": {"layer", "parallel"},
    "train": {"layer", "parallel", "model", "data", "runs", "telemetry", "tracking", "runtime"},
    "bench": {"layer", "parallel", "model", "runs", "telemetry", "runtime"},
    # the GPU check (python -m moe_impl gpu-check): measures the layers, models, trainer, bench
    "gpucheck": {"layer", "model", "runs", "telemetry", "train", "bench"},
    # the entry points
    "cli": {
        "layer",
        "parallel",
        "model",
        "data",
        "runs",
        "telemetry",
        "tracking",
        "train",
        "bench",
        "gpucheck",
        "runtime",
    },
    "__main__": {"cli"},
    # the package's public face: `from moe_impl import MoE, balancing`
    "moe_impl": {"layer"},
}

# imported in a fresh interpreter: the packages that must stay unloaded
HEAVY = ("torch", "matplotlib", "mlflow")
TORCH_FREE = {  # module -> what importing it must not load
    "moe_impl": {"torch"},  # the layers are re-exported lazily
    "moe_impl.runtime": {"torch"},
    "moe_impl.runs.rundir": {"torch", "mlflow"},
    "moe_impl.runs.runinfo": {"torch", "mlflow"},
    "moe_impl.runs.runsummary": {"torch", "mlflow"},  # summary.json's type, for the analysis
    "moe_impl.runs.sweeps": {"torch", "mlflow"},  # the workflow's run table, for any tool
    "moe_impl.runs.resources": {"torch", "mlflow"},  # each job's memory and time estimates
    "moe_impl.train.plan": {"torch", "mlflow"},  # `python -m moe_impl plan`
    "moe_impl.train.runtable": {"torch", "mlflow"},  # the workflow's run table, resolved
    "moe_impl.train.preflight": {"torch", "mlflow"},  # the workflow's onstart checks
    "moe_impl.train.processes": {"torch", "mlflow"},  # a run's processes and their rows
    "moe_impl.cli.plan": {"torch", "mlflow"},
    "moe_impl.model.flops": {"torch"},
    "moe_impl.model.config": {"torch"},
    "moe_impl.layer.config": {"torch"},
    "moe_impl.model.presets": {"torch"},
    "moe_impl.train.config": {"torch"},
    "moe_impl.train.prefetch": {"torch"},  # what a batch worker runs: numpy only
    "moe_impl.bench.spec": {"torch"},
    "moe_impl.data": {"torch"},
    "moe_impl.telemetry": {"torch"},  # torch only inside the CPU measurement
    "moe_impl.tracking": {"torch", "mlflow"},  # mlflow only inside the functions
}
WORKFLOW_FILES = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]


# --- reading the imports ------------------------------------------------------------------------


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """moe_impl.layer.flat -> layer; moe_impl.runtime -> runtime; moe_impl -> moe_impl."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moe_impl"


def exists(module: str, root: Path = ROOT) -> bool:
    base = root.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


STRING_MODULE = re.compile(r"moe_impl(\.\w+)+")  # a dotted name in a string: "moe_impl.cli.train"


@functools.cache
def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every moe_impl module `path` imports or names in a string."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                found.append((node.lineno, sub if exists(sub, root) else module))
        elif isinstance(node, ast.Constant) and STRING_MODULE.fullmatch(str(node.value)):
            found.append((node.lineno, node.value))  # an import table's entry
    return [(line, m) for line, m in found if m == "moe_impl" or m.startswith("moe_impl.")]


def violations(root: Path = ROOT) -> list[str]:
    """`file:line: source imports module` for each import that ALLOWED does not permit."""
    broken = []
    for path in sorted((root / "moe_impl").rglob("*.py")):
        source = component(module_name(path, root))
        for line, module in imported_modules(path, root):
            target = component(module)
            if target != source and target not in ALLOWED[source]:
                broken.append(f"{path.relative_to(root)}:{line}: {source} imports {module}")
    return broken


def missing_modules(root: Path = ROOT) -> list[str]:
    """`file:line: module` for each imported (or string-named) moe_impl module with no file."""
    return [
        f"{path.relative_to(root)}:{line}: {module}"
        for path in sorted((root / "moe_impl").rglob("*.py"))
        for line, module in imported_modules(path, root)
        if not exists(module, root)
    ]


# --- the contract -------------------------------------------------------------------------------


def test_the_table_is_a_layering_without_cycles():
    """Every component is declared, and the allowed imports form a DAG (a topological order)."""
    declared = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    declared |= {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {"moe_impl"}
    assert declared == ALLOWED.keys(), "declare each new subpackage or module in ALLOWED"
    for name, deps in ALLOWED.items():
        assert deps <= ALLOWED.keys() and name not in deps, name
    done: set[str] = set()
    while len(done) < len(ALLOWED):
        ready = {name for name, deps in ALLOWED.items() if name not in done and deps <= done}
        assert ready, f"a cycle among {sorted(ALLOWED.keys() - done)}"
        done |= ready


def test_every_import_follows_the_allowed_dependencies():
    broken = violations()
    assert not broken, "imports outside the declared architecture:\n" + "\n".join(broken)


def test_every_imported_moe_impl_module_exists():
    """Catches a lazy re-export or a CLI command table entry left behind by a move."""
    missing = missing_modules()
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The reader itself: absolute, relative, `from pkg import submodule` and string tables."""
    pkg = tmp_path / "moe_impl" / "layer"
    pkg.mkdir(parents=True)
    source = (
        "import moe_impl.runs.rundir\nfrom . import flat\nfrom .gating import noisy_top_k\n"
        "from moe_impl import runtime\nfrom moe_impl import MoE\n"
        "TABLE = {'a': 'moe_impl.cli.train', 'b': 'not moe_impl.x'}\n"
    )
    (pkg / "mod.py").write_text(source)
    for name in ("flat", "gating", "__init__"):
        (pkg / f"{name}.py").write_text("")
    for name in ("__init__", "runtime"):
        (tmp_path / "moe_impl" / f"{name}.py").write_text("")
    got = [m for _, m in imported_modules(pkg / "mod.py", root=tmp_path)]
    assert got == [
        "moe_impl.runs.rundir",
        "moe_impl.layer.flat",
        "moe_impl.layer.gating",
        "moe_impl.runtime",
        "moe_impl",
        "moe_impl.cli.train",
    ]
    # the layer may import itself only: three edges break the contract, two modules are missing
    assert violations(tmp_path) == [
        "moe_impl/layer/mod.py:1: layer imports moe_impl.runs.rundir",
        "moe_impl/layer/mod.py:4: layer imports moe_impl.runtime",
        "moe_impl/layer/mod.py:5: layer imports moe_impl",
        "moe_impl/layer/mod.py:6: layer imports moe_impl.cli.train",
    ]
    assert missing_modules(tmp_path) == [
        "moe_impl/layer/mod.py:1: moe_impl.runs.rundir",
        "moe_impl/layer/mod.py:6: moe_impl.cli.train",
    ]


# --- torch-free imports -------------------------------------------------------------------------

_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    print(name, *[m for m in {heavy!r} if m in sys.modules])
"""


def workflow_imports() -> list[str]:
    """The moe_impl and analysis modules the Snakefile and its rules import at parse time (of
    `from moe_impl.train import runtable, preflight`: the submodules)."""
    pattern = re.compile(
        r"^(?:from\s+((?:moe_impl|analysis)[\w.]*)\s+import\s+([\w, ]+)|import\s+((?:moe_impl|analysis)[\w.]*))",
        re.M,
    )
    found = set()
    for match in (m for f in WORKFLOW_FILES for m in pattern.finditer(f.read_text("utf-8"))):
        if match[3]:
            found.add(match[3])
            continue
        subs = [f"{match[1]}.{name.strip()}" for name in match[2].split(",")]
        found.update([sub for sub in subs if exists(sub)] or [match[1]])
    return sorted(found)


def test_the_workflow_imports_are_found():
    assert {"moe_impl.train.runtable", "moe_impl.runs.resources"} <= set(workflow_imports())


def test_torch_free_modules_do_not_load_torch():
    """One interpreter imports them in turn; a package that appears right after a module's import
    was loaded by that module (its predecessors had not loaded it)."""
    # the workflow parses on machines without torch, and must not pay matplotlib's start-up either
    wanted = dict(TORCH_FREE) | {m: {"torch", "matplotlib"} for m in workflow_imports()}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *wanted],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded, culprits = set(), []
    for line in proc.stdout.splitlines():
        name, *now = line.split()
        new, loaded = set(now) - loaded, loaded | set(now)
        if new & wanted[name]:
            culprits.append(f"import {name} loads {', '.join(sorted(new & wanted[name]))}")
    assert len(proc.stdout.splitlines()) == len(wanted)
    assert not culprits, "\n".join(culprits)


def test_the_public_names_are_the_modules_own():
    """`from moe_impl import MoE, HierarchicalMoE, MoEConfig, balancing` (lazy re-exports)."""
    import moe_impl
    from moe_impl.layer import balancing, config, flat, hierarchical

    assert moe_impl.balancing is balancing and moe_impl.MoEConfig is config.MoEConfig
    assert moe_impl.MoE is flat.MoE and moe_impl.HierarchicalMoE is hierarchical.HierarchicalMoE
