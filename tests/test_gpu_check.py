"""`python -m moe_impl gpu-check`: its pieces (report, comparisons, shared noise, device builds) in
the unit tier, and the whole check at toy size on the CPU (`--device cpu --quick`) in the
integration tier. On a GPU the same command runs at full size (docs/gpu.md has its report)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from moe_impl.cli import main
from moe_impl.cli.gpu_check import SECTIONS
from moe_impl.gpucheck import exactness
from moe_impl.gpucheck.build import on_device
from moe_impl.gpucheck.report import CheckFailed, Report, SectionSkipped
from moe_impl.layer.flat import MoE
from moe_impl.layer.hierarchical import HierarchicalMoE
from moe_impl.model.lm import MoELanguageModel, log_uniform_log_probs
from moe_impl.model.presets import ALL_PRESETS

CPU = torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_device_is_one_line(tmp_path, capsys):
    assert main(["gpu-check", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "environment,nope"], "unknown section(s) nope"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--max-minutes", "0"], "--max-minutes must be > 0"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    assert main(["gpu-check", "--device", "cpu", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_report_records_every_outcome_and_goes_on(tmp_path):
    report = Report(tmp_path, {"command": "test"})

    def broken():
        raise RuntimeError("boom\nsecond line")

    def out_of_tolerance():
        raise CheckFailed("y 1e-1 > 1e-4")

    def not_here():
        raise SectionSkipped("no grouped GEMM")

    report.run("a", "works", lambda: {"value": 1.5, "rows": [{"x": 1, "y": math.nan}]})
    report.run("b", "raises", broken)
    report.run("c", "fails a tolerance", out_of_tolerance)
    report.run("d", "does not apply", not_here)
    report.skip("e", "no time", "budget spent")
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {name: s["status"] for name, s in data["sections"].items()}
    assert status == {"a": "ok", "b": "failed", "c": "failed", "d": "skipped", "e": "skipped"}
    assert data["sections"]["b"]["error"] == "RuntimeError: boom"
    assert "Traceback" in data["sections"]["b"]["traceback"]
    assert data["sections"]["a"]["results"]["rows"][0]["y"] is None  # NaN is not JSON
    assert data["passed"] is False and not report.passed
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# gpu-check: FAILED")
    assert "| a | ok |" in md and "y 1e-1 > 1e-4" in md and "budget spent" in md


def test_rel_error_and_compare():
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert exactness.rel_error(ref + 0.04, ref) == pytest.approx(0.01)
    assert exactness.rel_error(ref + 0.04, ref, "l2") == pytest.approx(0.04 * 3**0.5 / 21**0.5)
    assert exactness.rel_error(ref[:2], ref) == math.inf
    i = torch.tensor([[0, 2]])
    a = torch.sparse_coo_tensor(i, torch.ones(2, 3), (4, 3), check_invariants=True)
    b = torch.sparse_coo_tensor(
        torch.tensor([[0, 3]]), torch.ones(2, 3), (4, 3), check_invariants=True
    )
    assert exactness.rel_error(a, a.clone()) == 0.0
    assert exactness.rel_error(a, b) == math.inf  # other experts got gradients
    rows = exactness.compare({"y": ref}, {"y": ref}, 1e-4, "same")
    assert rows[0]["ok"] and rows[0]["rel_error_max"] == 0.0
    with pytest.raises(CheckFailed, match=r"y 1\.00e-02"):
        exactness.compare({"y": ref + 0.04}, {"y": ref}, 1e-4, "off")
    counts = torch.tensor([1.0, 2.0])
    with pytest.raises(CheckFailed, match="tokens_per_expert"):  # routing must match exactly
        exactness.compare(
            {"tokens_per_expert": counts.flip(0)}, {"tokens_per_expert": counts}, 1.0, "r"
        )
    with pytest.raises(CheckFailed, match="one side only"):
        exactness.compare({"y": ref}, {"z": ref}, 1.0, "keys")


def test_shared_noise_is_one_float64_stream_cast_as_asked():
    first, again = exactness.SharedNoise(3), exactness.SharedNoise(3)
    a = first((4, 5), torch.zeros((), dtype=torch.float32))
    b = first((2,), torch.zeros((), dtype=torch.float64))
    c, d = again((4, 5), torch.zeros(1)), again((2,), torch.zeros(1, dtype=torch.float64))
    assert torch.equal(a, c) and torch.equal(b, d)
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    stream = torch.Generator().manual_seed(3)
    assert torch.equal(a, torch.randn((4, 5), generator=stream, dtype=torch.float64).float())
    assert torch.equal(b, torch.randn((2,), generator=stream, dtype=torch.float64))


@pytest.mark.parametrize("hierarchical", [False, True])
def test_a_noise_source_is_the_layers_noise(hierarchical):
    """A layer given a NoiseSource draws every sample from it, in the order and shapes it drew
    from a generator: a source that draws from a seeded generator gives that generator's results
    bit for bit; float64 and float32 twins given SharedNoise route alike."""
    torch.manual_seed(0)
    layer = HierarchicalMoE(8, 16, 3, 4) if hierarchical else MoE(8, 16, 6, 2)
    exactness.randomize_gates(layer, seed=1)
    x = torch.randn(32, 8)
    seeded = torch.Generator().manual_seed(7)
    source_stream = torch.Generator().manual_seed(7)
    calls = []

    def source(shape, like):
        calls.append(shape)
        return torch.randn(shape, generator=source_stream, device=like.device, dtype=like.dtype)

    want, got = layer(x, generator=seeded), layer(x, generator=source)
    assert torch.equal(want.y, got.y) and torch.equal(want.aux_loss, got.aux_loss)
    assert len(calls) == (2 if hierarchical else 1)
    twin = copy.deepcopy(layer).double()
    counts = [
        m(v, generator=exactness.SharedNoise(5)).stats.tokens_per_expert
        for m, v in ((layer, x), (twin, x.double()))
    ]
    assert torch.equal(*counts)


def test_float32_against_the_float64_reference_catches_a_wrong_expert():
    """The comparison the exactness section makes on a GPU, here float32 on the CPU: within
    tolerance as built, and far outside it when one expert's weights are perturbed."""
    torch.manual_seed(0)
    reference = HierarchicalMoE(16, 32, 4, 4).double()
    exactness.randomize_gates(reference, seed=1)
    layer = HierarchicalMoE(16, 32, 4, 4)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(64, 16, dtype=torch.float64)
    probe = torch.randn(64, 16, dtype=torch.float64)
    ref = exactness.run_step(reference, x, probe, train=True, bf16=False, seed=5)
    got = exactness.run_step(layer, x.float(), probe.float(), train=True, bf16=False, seed=5)
    rows = exactness.compare(got, ref, exactness.TOL_FLOAT32, "f32")
    assert {r["tensor"] for r in rows} >= {"y", "aux_loss", "grad_x", "grad_experts.w_in"}
    with torch.no_grad():
        layer.experts.w_out[int(ref["tokens_per_expert"].argmax())] *= 1.01
    got = exactness.run_step(layer, x.float(), probe.float(), train=True, bf16=False, seed=5)
    with pytest.raises(CheckFailed, match="y "):
        exactness.compare(got, ref, exactness.TOL_FLOAT32, "perturbed")


def test_on_device_draws_every_parameter():
    layer = on_device(lambda: HierarchicalMoE(8, 16, 4, 8), CPU)
    assert not any(p.is_meta for p in layer.parameters())
    w_in = layer.experts.w_in
    assert w_in.abs().max() <= math.sqrt(6 / 8) and w_in.std() > 0.1
    assert layer.primary_gate.w_gate.abs().sum() == 0  # gates start at zero (App. A)
    out = layer(torch.randn(32, 8))
    assert torch.isfinite(out.y).all()
    cfg = ALL_PRESETS["cpu/MoE-4"]
    model = on_device(lambda: MoELanguageModel(cfg), CPU)
    assert torch.equal(model.proposal_log_probs, log_uniform_log_probs(cfg.vocab_size))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exactness_section_passes_on_the_cpu():
    from moe_impl.gpucheck.sizes import QUICK

    results = exactness.check_against_reference(CPU, QUICK)
    assert results["worst"]["float32"] <= exactness.TOL_FLOAT32
    cases = {r["case"].split(", ")[1] for r in results["comparisons"]}
    assert cases == {"train float32", "eval float32", "train bf16 autocast"}


@pytest.mark.integration
def test_quick_check_on_the_cpu_writes_every_section(tmp_path):
    code = main(["gpu-check", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {n: s.get("error") for n, s in data["sections"].items() if s["status"] != "ok"}
    assert code == 0 and data["passed"], failed
    assert list(data["sections"]) == [name for name, _ in SECTIONS]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# gpu-check: PASSED")
    assert all(f"## {name}:" in md for name, _ in SECTIONS)
    sections = data["sections"]
    assert sections["scale"]["results"]["layer"]["experts"] == 131072
    speed = sections["layer_speed"]["results"]["rows"]
    assert {r["kernel"] for r in speed} == {"blocked", "grouped", "wide"}
    # the wide FFN is timed for the k = E layer only (4 experts, k = 4), and not picked on a CPU
    assert {r["experts"] for r in speed if r["kernel"] == "wide"} == {"4"}
    assert {r["auto_picks"] for r in speed} == {"blocked"}
    assert all(r["ratio_to_dense"] > 0 for r in speed)
    assert {r["routing"] for r in speed} == {"eager", "compiled"}
    lm = [r for r in sections["lm_step"]["results"]["rows"] if r["routing"] == "eager"]
    assert [r["paper_tflops_per_gpu"] for r in lm] == ["0.52", "0.89"]  # Table 7
    workflow = sections["workflow"]["results"]
    assert workflow["runs"] == len(workflow["rows"]) and workflow["projected_total_hours"] > 0
    # config/smoke.yaml's news100b sweep accumulates micro-batches, as config/gpu.yaml's does
    assert {r["micro_batches"] for r in workflow["rows"] if r["sweep"] == "news100b"} == {2}
    times = yaml.safe_load((tmp_path / "step_times.yaml").read_text())["cpu"]
    assert times["input"]["ms_per_batch"] > 0 and times["models"]
    assert all(
        {"step_ms", "tokens_per_step", "micro_batches", "params"} <= set(e)
        for e in times["models"].values()
    )
    trainer = sections["trainer"]["results"]["run"]
    assert trainer["steps"] == 20 and trainer["prefetch_workers"] == 1
    assert 0 <= trainer["input_wait_fraction"] < 1


@pytest.mark.integration
def test_max_minutes_skips_what_would_start_late(tmp_path):
    args = ["--only", "environment,exactness", "--max-minutes", "0.00001"]
    assert main(["gpu-check", "--device", "cpu", "--quick", "--out", str(tmp_path), *args]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["sections"]["exactness"]["status"] == "skipped"
    assert "--max-minutes" in data["sections"]["exactness"]["reason"]


def test_kernels_section_compares_the_wide_ffn_on_the_cpu():
    from moe_impl.gpucheck.sizes import QUICK

    results = exactness.check_kernels(CPU, QUICK)
    cases = {r["case"].split(", ")[1] for r in results["comparisons"] if "n=4 k=4" in r["case"]}
    assert cases == {"wide vs blocked"}
