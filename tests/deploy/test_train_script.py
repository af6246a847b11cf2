"""deploy/train_ml100k.sh under `r2ec train`'s rule that an --out holding a run is refused
unless --resume continues it or --overwrite replaces it: a finished stage is skipped, a stage
cut short is continued (RESUME=1), replaced (OVERWRITE=1) or refused with what to do. `r2ec` is
a stub here that records its arguments."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "train_ml100k.sh"
STUB = """#!/usr/bin/env bash
echo "$*" >> "$R2EC_CALLS"
out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out/best" && echo '{}' > "$out/log.jsonl"
"""


@pytest.fixture
def script(tmp_path):
    bin_dir, data = tmp_path / "bin", tmp_path / "data" / "ml-100k" / "loo"
    bin_dir.mkdir()
    (bin_dir / "r2ec").write_text(STUB)
    (bin_dir / "r2ec").chmod(0o755)
    data.mkdir(parents=True)
    (data / "meta.json").write_text("{}")
    calls = tmp_path / "calls"

    def run(**env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        calls.unlink(missing_ok=True)
        full = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "R2EC_CALLS": str(calls),
            "R2EC_DATA_DIR": str(tmp_path / "data"),
            **env,
        }
        done = subprocess.run(
            ["bash", str(SCRIPT), str(tmp_path / "runs")], env=full, capture_output=True, text=True
        )
        return done, calls.read_text().splitlines() if calls.exists() else []

    return run, tmp_path / "runs" / "onestage"


def test_a_fresh_stage_trains_and_a_finished_one_is_skipped(script):
    run, stage = script
    done, calls = run()
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1 and calls[0].startswith("train ") and "--resume" not in calls[0]
    assert "--overwrite" not in calls[0] and (stage / "done").is_file()
    done, calls = run(OVERWRITE="1")
    assert done.returncode == 0 and calls == []  # done: kept, even with OVERWRITE=1


def test_a_stage_cut_short_is_refused_continued_or_replaced(script):
    run, stage = script
    stage.mkdir(parents=True)
    (stage / "log.jsonl").write_text("{}\n")  # killed before its first save
    done, calls = run()
    assert done.returncode == 2 and calls == []
    assert "RESUME=1" in done.stderr and "OVERWRITE=1" in done.stderr
    done, calls = run(RESUME="1")
    assert done.returncode == 2 and calls == [] and "nothing to resume" in done.stderr
    (stage / "last").mkdir()
    (stage / "last" / "trainer_state.pt").write_bytes(b"")
    done, calls = run(RESUME="1")
    assert done.returncode == 0 and len(calls) == 1 and calls[0].endswith("--resume"), done.stderr
    (stage / "done").unlink()
    done, calls = run(OVERWRITE="1")
    assert done.returncode == 0 and len(calls) == 1 and calls[0].endswith("--overwrite"), done.stderr
