"""The operator's worst day (a full disk, a read-only volume, a damaged file) through the CLI:
one `error:` line that names the path and says what to do, exit 2; never a traceback, nor
click's bare "Aborted." for an EOFError."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from model.data import load_prepared
from tests.conftest import FIXTURES
from tests.model.test_retrain import TINY_TRAIN


def _one_error_line(result) -> str:
    """The run's one line: exit 2 (`fail`), `error: ...`, nothing raised past the command."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    return lines[0]


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapped lines
    return monkeypatch


# -- r2ec retrain --------------------------------------------------------------------------------
def _retrain(root: Path, data: Path, tmp_path: Path):
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAIN))
    args = ["retrain", "--data", str(data), "--root", str(root), "--redis-url", "", "--config", str(config)]
    return CliRunner().invoke(app, args)


def test_retrain_with_currents_item_table_emptied_names_it(env, versions_root, tiny_dataset, tmp_path):
    """np.load of a zero-length file raised EOFError, which click printed as "Aborted."."""
    (versions_root / "v0" / "item_vectors.npy").write_bytes(b"")
    line = _one_error_line(_retrain(versions_root, tiny_dataset.path, tmp_path))
    vectors = versions_root / "v0" / "item_vectors.npy"
    assert line.startswith(f"error: {vectors} is damaged or unreadable (EOFError")
    assert f"point {versions_root / 'CURRENT'} at a version that loads" in line


READ_ONLY = "that volume is mounted read-only: mount it read-write or use a directory on another"
FULL = "free some space there and run the command again"


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (OSError(errno.EROFS, "Read-only file system", "ROOT/retrain/lock"),
         f"ROOT/retrain/lock: Read-only file system; {READ_ONLY}"),
        (OSError(errno.ENOSPC, "No space left on device"),
         f"writing under ROOT: No space left on device; {FULL}"),
    ],
)  # fmt: skip
def test_retrain_on_a_read_only_or_full_volume_is_one_line(
    env, versions_root, tiny_dataset, tmp_path, raised, expected
):
    """Both were 100-line tracebacks: cli/retrain.py caught neither."""
    root = str(versions_root)
    if raised.filename:
        raised.filename = raised.filename.replace("ROOT", root)

    def fail(*args, **kwargs):
        raise raised

    env.setattr("model.retrain.rebuild_dataset", fail)
    line = _one_error_line(_retrain(versions_root, tiny_dataset.path, tmp_path))
    assert line == "error: " + expected.replace("ROOT", root)


def test_a_damaged_retrain_state_names_the_file(env, versions_root, tiny_dataset, tmp_path):
    (versions_root / "retrain").mkdir()
    (versions_root / "retrain" / "state.json").write_text('{"last_event_id": "1-0", "events')
    line = _one_error_line(_retrain(versions_root, tiny_dataset.path, tmp_path))
    assert line.startswith(f"error: {versions_root / 'retrain' / 'state.json'} is damaged or unreadable")


# -- r2ec data prepare ---------------------------------------------------------------------------
def _prepare(data_dir: Path):
    args = ["data", "prepare", "atomic", "--inter", str(FIXTURES / "data" / "tiny.inter")]
    args += ["--item", str(FIXTURES / "data" / "tiny.item"), "--name", "tiny", "--category", "movie"]
    return CliRunner().invoke(app, [*args, "--data-dir", str(data_dir)])


def test_data_prepare_on_a_full_disk_names_the_file_and_keeps_the_old_dataset(env, tmp_path):
    assert _prepare(tmp_path).exit_code == 0
    before = load_prepared(tmp_path / "tiny" / "loo").meta
    import model.data.dataset as dataset

    real = dataset.pq.write_table

    def full(table, where, *args, **kwargs):
        if "valid" in str(where):
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left")
        return real(table, where, *args, **kwargs)

    env.setattr(dataset.pq, "write_table", full)
    result = _prepare(tmp_path)
    line = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert line == [f"error: {tmp_path / 'tiny' / 'loo' / 'valid.parquet'}: No space left on device; {FULL}"]
    assert load_prepared(tmp_path / "tiny" / "loo").meta == before  # finding 10: still there, whole


# -- r2ec train ----------------------------------------------------------------------------------
TRAIN = ["--base", "tiny", "--stage", "contrastive", "--set", "per_device_batch_size=2"]
TRAIN += ["--set", "save_every=2", "--set", "eval_every=2", "--set", "dtype=float32"]


def _train(data: Path, out: Path, *more: str):
    return CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), *TRAIN, *more])


def test_train_on_a_disk_that_fills_while_the_adapter_is_written(env, tiny_dataset, tmp_path):
    """safetensors' own error (a traceback): now the path it was writing and what to do."""

    def full(*args, **kwargs):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    env.setattr("peft.peft_model.safe_save_file", full)
    result = _train(tiny_dataset.path, tmp_path / "run", "--max-steps", "2")
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'run'}/"), lines
    assert lines[0].endswith(f"/adapter: No space left on device; {FULL}")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary dir left


@pytest.fixture(scope="module")
def _saved_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "run"
    result = _train(tiny_dataset.path, out, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("size", [0, 5000])
def test_train_resume_from_a_cut_trainer_state_is_one_line(env, _saved_run, tiny_dataset, tmp_path, size):
    """Zero-length: "Aborted." (torch.load's EOFError); 5000 bytes: "[Errno 22] Invalid argument"."""
    run = tmp_path / "run"
    shutil.copytree(_saved_run, run)
    os.truncate(run / "last" / "trainer_state.pt", size)
    line = _one_error_line(_train(tiny_dataset.path, run, "--max-steps", "4", "--resume"))
    assert line.startswith(f"error: {run / 'last' / 'trainer_state.pt'} is damaged or unreadable (")
    assert line.endswith("the run cannot resume from it: start it over with --overwrite")


def test_train_resume_with_best_but_no_last_says_nothing_was_saved_yet(
    env, _saved_run, tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(_saved_run, run)
    shutil.rmtree(run / "last")
    line = _one_error_line(_train(tiny_dataset.path, run, "--max-steps", "4", "--resume"))
    assert "nothing was saved to resume from yet" in line
    assert line.endswith("start the run over with --overwrite")


# -- r2ec serve ----------------------------------------------------------------------------------
def test_serve_whose_first_load_fails_exits_with_one_line_naming_the_file(versions_root):
    """A version whose files are damaged (here its item table, cut in half): uvicorn logged
    Starlette's 57-line lifespan traceback and exited 3; a replica restarting onto it
    crash-looped with that as its only log."""
    import subprocess
    import sys

    from tests.service.conftest import serve_env

    root = versions_root
    vectors = root / "v0" / "item_vectors.npy"
    os.truncate(vectors, vectors.stat().st_size // 2)
    cmd = [sys.executable, "-m", "cli", "serve", "--port", "19750", "--redis-url", ""]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, cwd=repo, env=serve_env(root), capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [errors[-1]] and output.rstrip().endswith(errors[-1]), output
    assert errors[0].startswith(f"error: {vectors} is damaged or unreadable (ValueError: ")
    assert f"point {root / 'CURRENT'} at a version that loads" in errors[0]
    assert len(output.strip().splitlines()) <= 8, output  # uvicorn's start lines, its one failure line


def test_serve_refuses_a_damaged_or_missing_current_version_without_suggesting_init(
    env, versions_root, tmp_path
):
    """`checkpoint init --out ROOT` is the wrong advice for a versions root: init refuses it."""
    root = versions_root
    (root / "CURRENT").write_text("nosuch\n")
    line = _one_error_line(CliRunner().invoke(app, ["serve", "--checkpoint", str(root)]))
    assert line.startswith(f"error: {root / 'CURRENT'} names 'nosuch', which does not exist; point it back")
    assert "docs/operations.md" in line and "checkpoint init" not in line
    (root / "CURRENT").write_text("v0\n")
    (root / "v0" / "r2ec.json").write_text('{"format": "r2ec-checkpoint", "vers')  # cut short
    line = _one_error_line(CliRunner().invoke(app, ["serve", "--checkpoint", str(root)]))
    assert line.startswith(f"error: {root / 'v0' / 'r2ec.json'} is damaged or unreadable (JSONDecodeError")
    assert "checkpoint init" not in line
    # where nothing is there yet, init is the way to make it
    line = _one_error_line(CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "none")]))
    assert line.endswith(f"create one with `r2ec checkpoint init --data DIR --out {tmp_path / 'none'}`")
