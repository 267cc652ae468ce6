"""analysis/tables.py and analysis/report.py on collected runs: the tables put the paper's values
beside ours, and REPORT.md's verdicts follow their rules (analysis/rules.py; the rules themselves
on small frames are tests/test_report_rules.py's), the seeds setting the noise band."""

from __future__ import annotations

import pytest
from analysis_runs import good_runs, make_run, seeded_runs

from analysis import collect, report, rules, tables


@pytest.fixture(scope="module")
def good() -> collect.Collected:
    return collect.frames(good_runs())


def test_tables_put_paper_values_beside_ours(good):
    t7 = tables.table7(good.summary)
    row = t7[t7["paper model"] == "MoE-32"].iloc[0]
    assert row["test ppl (this run)"] == 120.0 and row["test ppl, 10 epochs (paper)"] == 39.7
    assert t7.loc[t7["paper model"] == "MoE-4096-h", "runs"].isna().all()  # paper only
    t8 = tables.table8(good.summary, good.snapshots)
    row = t8[t8["paper model"] == "MoE-131072-h"].iloc[0]
    assert (row["gap (this run)"], row["gap (paper)"]) == (31.0, pytest.approx(10.6))
    md = tables.to_markdown(tables.table6(good.summary))
    assert md.count("\n") == 2 + 7 and "| 0 | 0 | 1 | 125 | 39.8 |" in md
    tex = tables.to_latex(t7, "Table 7")
    assert "\\toprule" in tex and "emb. \\& softmax" in tex and "MoE-4096-h &" in tex


def test_report_verdicts_follow_the_numbers(good):
    v = {x.key: x for x in report.verdicts(good.summary, good.snapshots)}
    assert {k: x.status for k, x in v.items()} == dict.fromkeys(v, rules.REPRODUCED)
    assert all(x.paper_status == rules.PAPER_HOLDS for x in v.values())
    assert "4: 128, 32: 120, 256: 112, 1,024: 108" in v["more_experts"].reason
    text = report.render(list(v.values()), good.summary)
    assert text.count("**reproduced**") == 2 * 5 and "16 finished runs" in text
    assert "one seed per model: no seed spread measured" in v["more_experts"].reason
    assert "unigram perplexity 400" in v["gap"].reason and "## Regime" in text


def _status(key: str, runs: list[dict]) -> str:
    c = collect.frames(runs)
    return {v.key: v for v in report.verdicts(c.summary, c.snapshots)}[key].status


@pytest.mark.parametrize(
    ("key", "runs", "expected"),
    [
        (
            "more_experts",
            [make_run("lm1b", "cpu/MoE-4", 110.0), make_run("lm1b", "cpu/MoE-32", 120.0)],
            rules.NOT_REPRODUCED,
        ),
        (
            "more_experts",
            [
                make_run("lm1b", "cpu/MoE-4", 120.0),
                make_run("lm1b", "cpu/MoE-32", 121.0),
                make_run("lm1b", "cpu/MoE-256", 110.0),
            ],
            rules.REPRODUCED,
        ),  # +0.8%: within 1%
        (
            "more_experts",
            [
                make_run("lm1b", "cpu/MoE-4", 120.0),
                make_run("lm1b", "cpu/MoE-32", 125.0),
                make_run("lm1b", "cpu/MoE-256", 110.0),
            ],
            rules.NOT_REPRODUCED,
        ),
        ("more_experts", [make_run("lm1b", "cpu/MoE-4", 120.0)], rules.NOT_RUN),
        (
            "hier_flat",
            [make_run("lm1b", "cpu/MoE-256", 100.0), make_run("lm1b", "cpu/MoE-256-h", 104.0)],
            rules.NOT_REPRODUCED,
        ),
        ("hier_flat", [make_run("lm1b", "cpu/MoE-256", 100.0)], rules.NOT_RUN),
        (
            "hier_flat",  # MoE-2.2M (256 experts, hierarchical, 14x the ops) is not MoE-256's pair
            [
                make_run("lm1b", "cpu/MoE-256", 100.0),
                make_run("lm1b", "cpu/MoE-256-h", 101.0),
                make_run("lm1b", "cpu/MoE-2.2M", 80.0),
            ],
            rules.REPRODUCED,
        ),
        (
            "hier_flat",  # a budget model alone is no counterpart either
            [make_run("lm1b", "cpu/MoE-256", 100.0), make_run("lm1b", "cpu/MoE-2.2M", 101.0)],
            rules.NOT_RUN,
        ),
        (
            "gap",
            [
                make_run("news100b", "cpu/MoE-32", 50.0, early=80.0),
                make_run("news100b", "cpu/MoE-256-h", 50.0, early=75.0),
                make_run("news100b", "cpu/MoE-1024-h", 50.0, early=70.0),
            ],
            rules.NOT_REPRODUCED,
        ),
        (
            "gap",  # widens, but N is still at the unigram stage (200 vs unigram 400)
            [
                make_run("news100b", "cpu/MoE-32", 100.0, early=180.0),
                make_run("news100b", "cpu/MoE-256-h", 100.0, early=190.0),
                make_run("news100b", "cpu/MoE-1024-h", 100.0, early=200.0),
            ],
            rules.NOT_TESTABLE,
        ),
        (
            "gap",  # the corpus's unigram perplexity unknown
            [
                make_run("news100b", f"cpu/{m}", 50.0, early=e, unigram=None)
                for m, e in (("MoE-32", 70.0), ("MoE-256-h", 75.0), ("MoE-1024-h", 80.0))
            ],
            rules.NOT_TESTABLE,
        ),
        ("gap", [make_run("news100b", "cpu/MoE-32", 100.0, early=200.0)], rules.NOT_RUN),
        (
            "degrade",  # more experts help up to 16384, but 131072 is within 1% of 65536
            [
                make_run("news100b", "cpu/MoE-32", 60.0),
                make_run("news100b", "cpu/MoE-16384-h", 50.0),
                make_run("news100b", "cpu/MoE-65536-h", 48.0),
                make_run("news100b", "cpu/MoE-131072-h", 48.2),
            ],
            rules.NOT_REPRODUCED,
        ),
        (
            "degrade",  # worse at 131072, but more experts never helped
            [
                make_run("news100b", "cpu/MoE-32", 50.0),
                make_run("news100b", "cpu/MoE-16384-h", 55.0),
                make_run("news100b", "cpu/MoE-65536-h", 56.0),
                make_run("news100b", "cpu/MoE-131072-h", 58.0),
            ],
            rules.NOT_TESTABLE,
        ),
        (
            "degrade",  # no 16384-expert model to see more experts help
            [
                make_run("news100b", "cpu/MoE-65536-h", 120.0),
                make_run("news100b", "cpu/MoE-131072-h", 125.0),
            ],
            rules.NOT_RUN,
        ),
        (
            "degrade",  # the sweep stops at 4096 experts: the scale cannot show it
            [make_run("news100b", "cpu/MoE-4096-h", 120.0)],
            rules.NOT_TESTABLE,
        ),
        ("degrade", [make_run("lm1b", "cpu/MoE-4096-h", 120.0)], rules.NOT_RUN),
        (
            "hier_flat",  # -4.8%, but two seeds each 10% apart cannot resolve 3%
            [make_run("lm1b", "cpu/MoE-256", p, seed=i) for i, p in enumerate((100.0, 110.0))]
            + [make_run("lm1b", "cpu/MoE-256-h", p, seed=i) for i, p in enumerate((104.0, 96.0))],
            rules.NOT_TESTABLE,
        ),
        (
            "hier_flat",  # +0.9% with seeds 0.4% apart
            [make_run("lm1b", "cpu/MoE-256", p, seed=i) for i, p in enumerate((100.0, 100.4))]
            + [make_run("lm1b", "cpu/MoE-256-h", p, seed=i) for i, p in enumerate((101.0, 101.4))],
            rules.REPRODUCED,
        ),
        (
            "balance",
            [
                make_run("balance", "cpu/MoE-256", 100.0, w=(0, 0), cv=(0.5, 0.3, 3.5)),
                make_run("balance", "cpu/MoE-256", 100.0, cv=(0.38, 0.1, 2.2)),
            ],
            rules.NOT_REPRODUCED,
        ),  # CV(Importance) only x0.76
        (
            "balance",
            [make_run("balance", "cpu/MoE-256", 100.0, cv=(0.38, 0.1, 2.2))],
            rules.NOT_RUN,
        ),
    ],
)
def test_a_failing_or_missing_claim_says_so(key, runs, expected):
    assert _status(key, runs) == expected


def test_seeds_set_the_noise_band():
    """Two seeds per model: a +1.6% rise is beyond the fixed 1% but within 2 SE of the seeds'
    spread (~2.8%, band ~5.7%), so more experts still help."""
    seeded = seeded_runs("lm1b", {"MoE-4": (120, 125), "MoE-32": (122, 127), "MoE-256": (100, 104)})
    c = collect.frames(seeded)
    v = {x.key: x for x in report.verdicts(c.summary, c.snapshots)}["more_experts"]
    assert v.status == rules.REPRODUCED, v.reason
    assert "seed-to-seed SD 2.8% (pooled over 3 models, 2 seeds each)" in v.reason
    assert list(v.evidence["n_runs"]) == [2, 2, 2] and v.evidence["perplexity_sd"].notna().all()
    assert v.result.band == pytest.approx(v.result.noise.two_se) and v.result.n == 3
    single = seeded_runs("lm1b", {"MoE-4": (122.5,), "MoE-32": (124.5,), "MoE-256": (102.0,)})
    assert _status("more_experts", single) == rules.NOT_REPRODUCED  # +1.6% > 1%
