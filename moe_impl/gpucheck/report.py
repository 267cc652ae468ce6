"""The gpu-check report: one record per section, written as gpu_check.json and gpu_check.md after
every section. A section returns a dict of results (tables are lists of flat dicts) and may raise
`CheckFailed` when a measured value breaks its stated tolerance; any other exception is recorded
as the section's error, with the last frames of its traceback."""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path


class CheckFailed(AssertionError):
    """A section ran but a result is outside its tolerance (the message says which)."""


class SectionSkipped(Exception):
    """A section that does not apply here (the message says why); not a failure."""


def _clean(value):
    """JSON-safe: NaN/inf become None, tuples lists, other objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


class Report:
    def __init__(self, out_dir: Path, meta: dict) -> None:
        self.out_dir = out_dir
        self.meta = {"started_utc": datetime.now(UTC).isoformat(timespec="seconds"), **meta}
        self.sections: dict[str, dict] = {}
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def passed(self) -> bool:
        return all(s["status"] in ("ok", "skipped") for s in self.sections.values())

    def run(self, name: str, title: str, fn: Callable[[], dict]) -> dict:
        """Run one section, record its outcome and rewrite the report files."""
        print(f"[gpu-check] {name}: {title} ...", flush=True)
        start = time.perf_counter()
        record: dict = {"title": title}
        try:
            record.update(status="ok", results=fn())
        except SectionSkipped as err:
            record.update(status="skipped", reason=str(err))
        except CheckFailed as err:
            record.update(status="failed", error=str(err))
        except Exception as err:
            frames = traceback.format_exception(err)
            record.update(
                status="failed",
                error=f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                traceback="".join(frames[-4:]),
            )
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.sections[name] = record
        status = record["status"]
        extra = record.get("error") or record.get("reason") or ""
        print(f"[gpu-check] {name}: {status} in {record['seconds']:.1f} s {extra}", flush=True)
        self.write()
        return record

    def skip(self, name: str, title: str, reason: str) -> None:
        """Record a section that was not run, and why."""
        self.sections[name] = {"title": title, "status": "skipped", "reason": reason, "seconds": 0}
        print(f"[gpu-check] {name}: skipped: {reason}", flush=True)
        self.write()

    def to_json(self) -> dict:
        return _clean(
            {
                **self.meta,
                "passed": self.passed,
                "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "sections": self.sections,
            }
        )

    def write(self) -> None:
        data = self.to_json()
        (self.out_dir / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
        (self.out_dir / "gpu_check.md").write_text(to_markdown(data))


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def table(rows: list[dict]) -> str:
    """A Markdown table of flat dicts (the union of their keys, in first-seen order)."""
    if not rows:
        return "(no rows)\n"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_markdown(data: dict) -> str:
    verdict = "PASSED" if data["passed"] else "FAILED"
    lines = [
        f"# gpu-check: {verdict}",
        "",
        f"Started {data['started_utc']}, finished {data['finished_utc']}; "
        f"`{data.get('command', '')}`.",
        "",
        "| section | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, s in data["sections"].items():
        note = (s.get("error") or s.get("reason") or "").replace("|", "/")
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {note[:160]} |")
    for name, s in data["sections"].items():
        lines += ["", f"## {name}: {s['title']}", "", f"Status: **{s['status']}**."]
        if s.get("error"):
            lines += ["", f"Error: `{s['error']}`"]
        if s.get("traceback"):
            lines += ["", "```", s["traceback"].rstrip(), "```"]
        if s.get("reason"):
            lines += ["", f"Skipped: {s['reason']}"]
        for key, value in (s.get("results") or {}).items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                lines += ["", f"**{key}**", "", table(value).rstrip()]
            elif isinstance(value, dict):
                lines += ["", f"**{key}**", "", table([value]).rstrip()]
            else:
                lines += ["", f"- {key}: {_fmt(value)}"]
    return "\n".join(lines) + "\n"
