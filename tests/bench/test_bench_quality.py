"""bench/bench_quality.py's rows: which `r2ec eval` runs it makes (the runs themselves faked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "bench_quality.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls: list[list[str]] = []

    def fake_eval(args: list[str]) -> dict:
        calls.append(args)
        metrics = dict.fromkeys(module.METRICS, 0.1)
        out = {"model": "x", "split": "test", "reasoning": "--compare-reasoning" in args, "metrics": metrics}
        out |= {"stderr": dict.fromkeys(module.METRICS, None), "by_mask": {"none": {"ndcg@10": 0.05}}}
        if "--compare-reasoning" in args:
            pair = {"diff": 0.01, "stderr": 0.02, "ratio": None}
            rank = {"rank_ratio": 0.9, "a_better": 3, "b_better": 1}
            off = {
                "metrics": dict.fromkeys(module.METRICS, 0.2),
                "stderr": dict.fromkeys(module.METRICS, 0.0),
            }
            out |= {"without_reasoning": off, "paired_ndcg@10": pair, "paired_rank": rank}
        return out

    monkeypatch.setattr(module, "run_eval", fake_eval)
    return module, calls


def _main(module, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", *argv])
    module.main()


def test_the_untrained_rows_default_to_checkpoints_base_and_say_when_it_is_missing(
    bench, monkeypatch, tmp_path, capsys
):
    module, calls = bench
    monkeypatch.chdir(tmp_path)  # no checkpoints/base here
    with pytest.raises(SystemExit) as exc:
        _main(module, monkeypatch, "--out", str(tmp_path / "q.jsonl"))
    assert "checkpoints/base does not exist" in str(exc.value) and "r2ec checkpoint init" in str(exc.value)
    assert calls == []  # before any run


def test_each_model_runs_once_and_the_baselines_as_documented(bench, monkeypatch, tmp_path, capsys):
    module, calls = bench
    (tmp_path / "base").mkdir()
    out = tmp_path / "q.jsonl"
    _main(module, monkeypatch, "--base-checkpoint", str(tmp_path / "base"), "--out", str(out))
    models = [c for c in calls if "--checkpoint" in c]
    assert len(models) == 1 and "--compare-reasoning" in models[0]  # not a second no-reasoning pass
    baselines = [c[c.index("--baseline") + 1 :] for c in calls if "--baseline" in c]
    assert baselines == [["pop"], ["sasrec", "--sasrec-epochs", "10"], ["cowatch"]]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in records] == [
        "pop",
        "sasrec",
        "cowatch",
        "untrained no reasoning",
        "untrained +reasoning",
    ]
    assert records[3]["metrics"]["ndcg@10"] == 0.2 and "paired_ndcg@10" not in records[3]
    table = capsys.readouterr().out
    assert "| untrained +reasoning |" in table and "(nanx)" in table  # a null ratio prints, not a crash
    calls.clear()
    _main(
        module,
        monkeypatch,
        "--base-checkpoint",
        str(tmp_path / "base"),
        "--out",
        str(out),
        "--only",
        "untrained no reasoning",
    )
    assert len(calls) == 1 and "--no-reasoning" in calls[0]


def test_a_compare_runs_no_reasoning_row_holds_that_pass_only(bench):
    """Split from a --compare-reasoning run, the no-reasoning row is named and described as a
    --no-reasoning run would be, with that pass's metrics and time; none of the reasoning
    pass's texts, drafting, time or reasoning-only settings."""
    module, _ = bench
    metrics = dict.fromkeys(module.METRICS, 0.1)
    run = {"reasoning": "both", "max_reasoning_tokens": 64, "constrain_titles": True, "dtype": "bfloat16"}
    run |= {"backend": "engine", "quantize": "none", "speculative_tokens": 8}
    off = {"metrics": dict.fromkeys(module.METRICS, 0.2), "stderr": dict.fromkeys(module.METRICS, 0.0)}
    result = {"model": "checkpoint V", "split": "test", "reasoning": True, "metrics": metrics}
    result |= {"stderr": metrics, "mask": "seen", "count": 2, "seconds": 9.5, "examples": [{"rank": 1}]}
    result |= {"backend": "engine", "quantize": "none", "speculative_tokens": 8, "run": run}
    result |= {"draft_tokens": {"checked": 4, "accepted": 2}, "text_quality": {"distinct_2": 0.5}}
    result |= {"without_reasoning": off | {"seconds": 1.25}, "paired_ndcg@10": {}, "paired_rank": {}}
    fast, slow = module.rows_of(["m no reasoning", "m +reasoning"], result)
    assert fast == {
        "label": "m no reasoning",
        "model": "checkpoint V without reasoning",
        "reasoning": False,
        "split": "test",
        "mask": "seen",
        "count": 2,
        "backend": "engine",
        "quantize": "none",
        "metrics": off["metrics"],
        "stderr": off["stderr"],
        "seconds": 1.25,
        "run": {"reasoning": False, "dtype": "bfloat16", "backend": "engine", "quantize": "none"},
    }
    assert slow == {"label": "m +reasoning", **result}
    del result["without_reasoning"]["seconds"]  # an eval from before it timed the pass: no time
    assert "seconds" not in module.rows_of(["m no reasoning", "m +reasoning"], result)[0]
