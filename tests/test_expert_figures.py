"""Issue 31's figures (analysis/fig_expert_load.py, `python -m analysis experts`): the Lorenz
curve and Gini against closed forms, the heatmap's sorting and binning, and the command drawing
each run's figure and each sweep's `expert_load_<sweep>.png` from real tiny runs (the balance
sweep's without and with the balancing losses side by side). Unit tier: in-process runs of a few
seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny

from analysis import cli, fig_expert_load
from moe_impl.runs.expertstats import read_expert_stats
from moe_impl.train.loop import Trainer


def test_lorenz_and_gini_of_equal_and_of_one_taking_all():
    frac, cum, gini = fig_expert_load.lorenz(np.full(8, 5))
    assert gini == pytest.approx(0.0) and cum[-1] == pytest.approx(1.0)
    assert np.allclose(cum, frac)
    _, _, all_on_one = fig_expert_load.lorenz(np.array([0, 0, 0, 12]))
    assert all_on_one == pytest.approx(1 - 1 / 4)  # n experts: 1 - 1/n at the limit
    _, _, half = fig_expert_load.lorenz(np.array([0, 0, 1, 1]))
    assert half == pytest.approx(0.5)


def test_heatmap_rows_are_sorted_by_final_load_and_binned():
    stats = {
        "layout": {"num_experts": 4},
        "snapshots": {
            10: {"load": np.array([1, 2, 3, 6])},
            20: {"load": np.array([4, 0, 2, 2])},
        },
    }
    rel, steps = fig_expert_load.shares(stats)
    assert steps == [10, 20]
    assert rel[:, 1].tolist() == [2.0, 1.0, 1.0, 0.0]  # busiest at the end first
    assert rel[0, 0] == pytest.approx(1 / 3)  # expert 0: 1 of a mean of 3 at step 10
    many = {"layout": {"num_experts": 1000}, "snapshots": {5: {"load": np.arange(1000)}}}
    binned, _ = fig_expert_load.shares(many)
    assert binned.shape == (fig_expert_load.MAX_ROWS, 1)
    assert binned.mean() == pytest.approx(1.0, rel=1e-2)  # bins of (nearly) equal size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny MoE runs: an lm1b one and the balance sweep without and with the losses."""
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "lm1b/MoE": ["sweep=lm1b"],
        "balance/off": ["sweep=balance", "model.w_importance=0", "model.w_load=0"],
        "balance/on": ["sweep=balance", "model.w_importance=0.1", "model.w_load=0.1"],
    }
    for name, more in specs.items():
        Trainer(tiny("train.log_every=2", *more), root / name).run()
    return root


def test_the_command_draws_every_run_and_sweep(runs, tmp_path, capsys):
    assert read_expert_stats(runs / "lm1b" / "MoE")["snapshots"]
    assert cli.main(["experts", str(runs), "--out", str(tmp_path)]) == 0
    figures = tmp_path / "figures"
    for sweep in ("lm1b", "balance"):
        assert (figures / f"expert_load_{sweep}.png").stat().st_size > 10_000
    drawn = sorted(p.relative_to(figures).as_posix() for p in figures.glob("experts/*/*.png"))
    assert len(drawn) == 3, drawn
    assert "3 runs with expert statistics" in capsys.readouterr().out


def test_the_balance_figure_puts_the_runs_without_and_with_the_losses_side_by_side(runs):
    from analysis import collect

    data, _ = collect.collect_runs(runs)
    stats = {
        r: read_expert_stats(d)
        for r, d in zip(data.summary["run_id"], data.summary["run_dir"], strict=True)
    }
    panels = cli._balance_panels(data.summary, stats)
    assert [label for label, _ in panels] == [
        "w_importance=0, w_load=0",
        "w_importance=0.1, w_load=0.1",
    ]
    fig = fig_expert_load.balance_figure(panels)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()][:2] == [p[0] for p in panels]
    # one colour scale for both panels: the largest load / mean load of either run
    images = [ax.images[0] for ax in fig.axes if ax.images]
    want = max(float(fig_expert_load.shares(st)[0].max()) for _, st in panels)
    assert [im.norm.vmax for im in images] == [max(want, 1.0)] * 2


@pytest.mark.integration  # an MLflow store
def test_each_runs_figure_is_attached_to_its_mlflow_run_once(tmp_path, capsys):
    from moe_impl.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "lm1b" / "MoE"
    Trainer(tiny("sweep=lm1b", "tracking.enabled=true", f"tracking.uri={uri}"), run_dir).run()
    for _ in range(2):  # the workflow's experts rule reruns: the figure is replaced, not added
        assert cli.main(["experts", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert "figures attached to 1 of 1 runs" in capsys.readouterr().out
    client = store.open_client(uri)
    identity = json.loads((run_dir / "run.json").read_text())
    run = store.find_run(client, identity["run_id"])
    listed = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert listed == ["figures/MoE.png"]


def test_without_a_store_nothing_is_created(tmp_path, capsys):
    """An untracked run (TINY: tracking off) is left out; no store appears."""
    Trainer(tiny("sweep=lm1b"), tmp_path / "runs" / "lm1b" / "MoE").run()
    assert cli.main(["experts", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert "figures attached" not in capsys.readouterr().out
    assert not list(tmp_path.glob("**/*.db"))
