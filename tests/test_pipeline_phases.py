"""A pipeline with phases (``speech_ssl.pipeline.Phase``): later stages built from earlier stages' results,
in one run (one lock, one summary), skipped on a re-run with the same results, and checked like any stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speech_ssl.pipeline import Stage, read_record, run_pipeline

calls: list[str] = []


def measure(cfg: dict) -> dict:
    calls.append("measure")
    return {"n": cfg["n"]}


def work(cfg: dict) -> dict:
    calls.append(f"work{cfg['i']}")
    return {"i": cfg["i"]}


def stages(n: int) -> list:
    def more(results: dict) -> list[Stage]:  # as many work stages as the measure stage said
        return [Stage(f"work/{i}", work, {"i": i}, needs=["measure"]) for i in range(results["measure"]["n"])]

    def last(results: dict) -> list[Stage]:
        done = sorted(r["i"] for name, r in results.items() if name.startswith("work/"))
        return [Stage("total", work, {"i": sum(done)}, needs=[f"work/{i}" for i in done])]

    return [Stage("measure", measure, {"n": n}), more, last]


def test_phases_build_stages_from_earlier_results_and_a_rerun_skips_them(tmp_path: Path):
    calls.clear()
    summary = run_pipeline("phases", stages(3), tmp_path)
    assert calls == ["measure", "work0", "work1", "work2", "work3"]  # total: i = 0 + 1 + 2
    assert [row["stage"] for row in summary["stages"]] == ["measure", "work/0", "work/1", "work/2", "total"]
    assert read_record(tmp_path / "work" / "2")["status"] == "done"
    assert json.loads((tmp_path / "summary.json").read_text())["stages"][-1]["status"] == "ran"

    calls.clear()
    summary = run_pipeline("phases", stages(3), tmp_path)
    assert calls == []
    assert {row["status"] for row in summary["stages"]} == {"skipped"}

    calls.clear()  # the first stage changes: the phases build other stages from its new result
    run_pipeline("phases", stages(2), tmp_path)
    assert calls == ["measure", "work0", "work1", "work1"]  # work/0, work/1 read the new measure; total: 0 + 1


def test_a_phase_s_stages_are_checked_like_any_stage(tmp_path: Path):
    bad_needs = [Stage("measure", measure, {"n": 1}), lambda results: [Stage("w", work, {"i": 0}, needs=["nope"])]]
    with pytest.raises(ValueError, match="needs"):
        run_pipeline("phases", bad_needs, tmp_path / "a")
    twice = [Stage("measure", measure, {"n": 1}), lambda results: [Stage("measure", measure, {"n": 2})]]
    with pytest.raises(ValueError, match="two stages are named measure"):
        run_pipeline("phases", twice, tmp_path / "b")
