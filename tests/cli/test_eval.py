"""`r2ec eval` end to end on the tiny dataset: the --json payload and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from model import evaluate
from model.checkpoint import create_base_checkpoint
from model.evaluate import ranking_metrics

METRICS = {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}


def _eval(*args: str) -> tuple[int, str]:
    """Exit code and stdout (the progress bar goes to stderr), or everything on failure."""
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    create_base_checkpoint(out, "tiny", tiny_dataset.items, dtype="float32", progress=False)
    return out


def test_eval_json_for_pop_and_a_checkpoint_with_reasoning(tiny_dataset, tiny_checkpoint, monkeypatch):
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop", "--json")
    assert code == 0, out
    pop = json.loads(out.strip().splitlines()[-1])
    assert pop["model"] == "pop" and pop["reasoning"] is False and set(pop["metrics"]) == METRICS
    assert pop["count"] == len(tiny_dataset.split("test"))
    # the co-watch baseline ranks at the window asked for (the tiny data's few pairs rank the
    # same at any window, so the call is watched) and says which
    windows = []
    real = evaluate.evaluate_cowatch
    monkeypatch.setattr(evaluate, "evaluate_cowatch", lambda d, c, w: windows.append(w) or real(d, c, w))
    for args, window, label in (([], 10, "cowatch"), (["--cowatch-window", "3"], 3, "cowatch (window 3)")):
        code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "cowatch", *args, "--json")
        assert code == 0, out
        cowatch = json.loads(out.strip().splitlines()[-1])
        assert cowatch["model"] == label and cowatch["cowatch_window"] == windows[-1] == window
    assert "cowatch_window" not in pop

    args = ["--data", str(tiny_dataset.path), "--checkpoint", str(tiny_checkpoint), "--split", "valid"]
    # one user at a time, so each one's drafts may come from the texts written before it
    one_by_one = ["--limit", "3", "--max-reasoning-tokens", "8", "--batch-size", "1"]
    code, out = _eval(*args, *one_by_one, "--dtype", "float32", "--json")
    assert code == 0, out
    payload = json.loads(out.strip().splitlines()[-1])
    n = min(3, len(tiny_dataset.split("valid")))
    assert payload["split"] == "valid" and payload["reasoning"] is True and payload["count"] == n
    assert all(0.0 <= v <= 1.0 for v in payload["metrics"].values())
    assert [set(e) for e in payload["examples"]] == [{"user_id", "target", "rank", "reasoning"}] * n
    # the engine backend, speculative as served: what its drafts did is in the payload
    assert payload["backend"] == "engine" and payload["speculative_tokens"] == 8
    drafts = payload["draft_tokens"]
    assert drafts["checked"] > 0 and drafts["checked"] >= drafts["accepted"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "pop", "--base", "tiny"], "give exactly one of --checkpoint, --base or --baseline"),
        (["--baseline", "random"], "--baseline must be one of pop, sasrec, cowatch, got 'random'"),
        (["--baseline", "pop", "--mask", "history"], "mask must be one of"),
        (["--base", "tiny", "--quantize", "int4"], "--quantize must be none, int8 or auto"),
        (["--base", "tiny", "--quantize", "int8", "--dtype", "float32"], "--quantize int8 needs"),
        (["--base", "tiny", "--speculative-tokens", "-1"], "--speculative-tokens must be >= 0"),
        (["--baseline", "cowatch", "--cowatch-window", "0"], "--cowatch-window must be >= 1, got 0"),
        (["--baseline", "pop", "--cowatch-window", "5"], "--cowatch-window needs --baseline cowatch"),
        (["--baseline", "pop", "--compare-reasoning"], "--compare-reasoning needs"),
        (["--baseline", "pop", "--split", "dev"], "dev"),
        (["--checkpoint", "/nowhere"], "/nowhere does not exist"),
        (["--baseline", "pop", "--sasrec-epochs", "3"], "--sasrec-epochs needs --baseline sasrec"),
        (["--baseline", "cowatch", "--no-reasoning"], "--no-reasoning needs --checkpoint or --base"),
        (["--base", "tiny", "--compare-reasoning", "--no-reasoning"], "give it without --no-reasoning"),
        (["--base", "tiny", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_eval_errors_name_the_problem(tiny_dataset, args, message):
    code, out = _eval("--data", str(tiny_dataset.path), *args)
    assert code != 0 and message in out


def test_compare_reasoning_pairs_the_two_modes_by_metric_and_by_rank(tiny_dataset, tiny_checkpoint, tmp_path):
    args = ["--data", str(tiny_dataset.path), "--checkpoint", str(tiny_checkpoint), "--dtype", "float32"]
    args += ["--compare-reasoning", "--max-reasoning-tokens", "4", "--limit", "4"]
    code, out = _eval(*args, "--json", "--ranks-out", str(tmp_path / "ranks.parquet"))
    assert code == 0, out
    payload = json.loads(out.strip().splitlines()[-1])
    n = min(4, len(tiny_dataset.split("test")))
    pair, ranks = payload["paired_ndcg@10"], payload["paired_rank"]
    assert pair["users"] == ranks["users"] == n
    # a is the reasoning pass (the headline), b the one without
    assert pair["a"] == payload["metrics"]["ndcg@10"]
    assert pair["b"] == payload["without_reasoning"]["metrics"]["ndcg@10"]
    assert payload["without_reasoning"]["seconds"] >= 0  # that pass's own time (bench_quality's row)
    assert ranks["a_better"] + ranks["b_better"] + ranks["ties"] == n
    assert ranks["rank_ratio"] > 0 and ranks["median_a"] >= 1
    # the ranks file holds both modes' per-user ranks, the samples in the harness's order
    saved = pd.read_parquet(tmp_path / "ranks.parquet")
    assert list(saved["user_id"]) == list(tiny_dataset.split("test")["user_id"].astype(str).head(n))
    assert ranking_metrics(saved["rank"])["ndcg@10"] == pytest.approx(pair["a"])
    assert ranking_metrics(saved["rank_without_reasoning"])["ndcg@10"] == pytest.approx(pair["b"])
    code, out = _eval(*args)
    assert code == 0, out
    assert "reasoning on vs off, the target's rank: better for" in out


def test_paired_with_pairs_a_run_with_a_saved_one_per_user(tiny_dataset, tiny_checkpoint, tmp_path):
    data = ["--data", str(tiny_dataset.path)]
    pop_ranks = tmp_path / "pop.parquet"
    code, out = _eval(*data, "--baseline", "pop", "--json", "--ranks-out", str(pop_ranks))
    assert code == 0, out
    pop = json.loads(out.strip().splitlines()[-1])
    n = pop["count"]
    saved = pd.read_parquet(pop_ranks)
    assert len(saved) == n and set(saved["model"]) == {"pop"} and set(saved["mask"]) == {"seen"}
    assert ranking_metrics(saved["rank"])["ndcg@10"] == pytest.approx(pop["metrics"]["ndcg@10"])

    # Pop against itself: every user a tie
    code, out = _eval(*data, "--baseline", "pop", "--json", "--paired-with", str(pop_ranks))
    assert code == 0, out
    same = json.loads(out.strip().splitlines()[-1])["paired_with"]
    assert same["ndcg@10"]["diff"] == 0.0 and same["rank"]["ties"] == n

    # a checkpoint against Pop: a is this run, b the saved one
    args = [*data, "--checkpoint", str(tiny_checkpoint), "--dtype", "float32", "--no-reasoning"]
    code, out = _eval(*args, "--json", "--paired-with", str(pop_ranks))
    assert code == 0, out
    payload = json.loads(out.strip().splitlines()[-1])
    pw = payload["paired_with"]
    assert pw["a"].startswith("checkpoint ") and pw["a"].endswith(" without reasoning")
    assert pw["b"] == "pop" and pw["path"] == str(pop_ranks)
    assert pw["ndcg@10"]["a"] == pytest.approx(payload["metrics"]["ndcg@10"])
    assert pw["ndcg@10"]["b"] == pytest.approx(pop["metrics"]["ndcg@10"])
    assert pw["rank"]["a_better"] + pw["rank"]["b_better"] + pw["rank"]["ties"] == n
    code, out = _eval(*args, "--paired-with", str(pop_ranks))
    assert code == 0 and "against pop (" in out


def test_paired_column_pairs_with_the_saved_runs_no_reasoning_mode(tiny_dataset, tiny_checkpoint, tmp_path):
    args = ["--data", str(tiny_dataset.path), "--checkpoint", str(tiny_checkpoint), "--dtype", "float32"]
    both = tmp_path / "both.parquet"
    code, out = _eval(*args, "--compare-reasoning", "--max-reasoning-tokens", "4", "--ranks-out", str(both))
    assert code == 0, out
    # the same model's fast path against the saved fast path: every user a tie
    pair = ["--paired-with", str(both), "--paired-column", "rank_without_reasoning"]
    code, out = _eval(*args, "--no-reasoning", "--json", *pair)
    assert code == 0, out
    pw = json.loads(out.strip().splitlines()[-1])["paired_with"]
    assert pw["a"] == pw["b"] and pw["b"].endswith(" without reasoning") and pw["ndcg@10"]["diff"] == 0.0
    assert pw["rank"]["ties"] == pw["rank"]["users"] == len(tiny_dataset.split("test"))
    assert pw["differs"] == {}  # the saved column's mode is this run's: reasoning off
    code, out = _eval(*args, "--no-reasoning", "--paired-column", "rank_without_reasoning")
    assert code == 2 and "--paired-column needs --paired-with" in out


def test_paired_with_refuses_a_run_it_cannot_pair(tiny_dataset, tmp_path):
    data = ["--data", str(tiny_dataset.path), "--baseline", "pop"]
    pop_ranks = tmp_path / "pop.parquet"
    assert _eval(*data, "--ranks-out", str(pop_ranks))[0] == 0
    (tmp_path / "junk.parquet").write_text("not parquet")
    pd.DataFrame({"user_id": ["1"], "rank": [3]}).to_parquet(tmp_path / "bare.parquet")
    for args, message in [
        (["--paired-with", str(tmp_path / "missing.parquet")], "missing.parquet: no such file"),
        (["--paired-with", str(tmp_path / "junk.parquet")], "junk.parquet: unreadable"),
        (["--paired-with", str(tmp_path / "bare.parquet")], "no column target_item_id, split, mask, model"),
        (["--paired-with", str(pop_ranks), "--mask", "prompt"], "its mask is seen, this run's is prompt"),
        (["--paired-with", str(pop_ranks), "--split", "valid"], "its split is test, this run's is valid"),
        (["--paired-with", str(pop_ranks), "--limit", "1"], "its user_ids are not this run's"),
        (["--ranks-out", str(tmp_path)], "is a directory"),
    ]:
        code, out = _eval(*data, *args)
        assert code == 2 and message in out, (args, out)  # 2: refused by fail(), not a traceback


def test_a_failed_ranks_write_prints_the_results_then_fails(tiny_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    where = blocker / "r.parquet"  # under a file: the write fails after the run
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop", "--ranks-out", str(where))
    assert code == 2 and "pop on " in out and f"--ranks-out {where}" in out


def _strict(text: str) -> dict:
    """The last line parsed as standard JSON: NaN/Infinity refused, as JavaScript's JSON.parse does."""

    def refuse(name: str):
        raise ValueError(f"not standard JSON: {name}")

    return json.loads(text.strip().splitlines()[-1], parse_constant=refuse)


def test_json_is_standard_json_with_null_for_what_is_undefined(tiny_dataset):
    # one sample: every standard error is undefined (NaN in Python)
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop", "--limit", "1", "--json")
    assert code == 0, out
    payload = _strict(out)
    assert set(payload["stderr"]) == METRICS and all(v is None for v in payload["stderr"].values())
    # the text output keeps its "± nan"
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop", "--limit", "1")
    assert code == 0 and "± nan" in out


def test_the_json_and_the_ranks_file_say_how_the_run_was_made(tiny_dataset, tiny_checkpoint, tmp_path):
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop", "--limit", "2", "--json")
    assert code == 0, out
    run = _strict(out)["run"]
    assert run["data"] == {"path": str(tiny_dataset.path.resolve()), "name": "tiny", "protocol": "loo"}
    assert run["baseline"] == {"name": "pop"} and run["limit"] == 2 and run["mask"] == "seen"
    assert set(run["code"]) == {"commit", "dirty"} and run["code"]["commit"]

    args = ["--data", str(tiny_dataset.path), "--checkpoint", str(tiny_checkpoint), "--dtype", "float32"]
    args += ["--limit", "2", "--batch-size", "2", "--device", "cpu"]
    ranks = tmp_path / "free.parquet"
    code, out = _eval(
        *args, "--max-reasoning-tokens", "4", "--free-titles", "--ranks-out", str(ranks), "--json"
    )
    assert code == 0, out
    run = _strict(out)["run"]
    assert run["checkpoint"]["path"] == str(tiny_checkpoint.resolve()) and run["checkpoint"]["version"]
    assert run["max_reasoning_tokens"] == 4 and run["constrain_titles"] is False and run["reasoning"] is True
    assert (run["dtype"], run["device"], run["backend"], run["batch_size"]) == ("float32", "cpu", "engine", 2)
    assert pd.read_parquet(ranks).attrs["run"] == run  # the ranks file carries the same block
    # the same checkpoint against itself: the pairing names the settings the two runs differ in
    code, out = _eval(*args, "--max-reasoning-tokens", "2", "--paired-with", str(ranks))
    assert code == 0, out
    assert "constrain_titles True here, False there" in out and "max_reasoning_tokens 2 here, 4 there" in out
    code, out = _eval(*args, "--max-reasoning-tokens", "2", "--paired-with", str(ranks), "--json")
    assert _strict(out)["paired_with"]["differs"] == {
        "constrain_titles": [True, False],
        "max_reasoning_tokens": [2, 4],
    }


def test_the_run_block_names_a_relative_base_by_its_absolute_path(tiny_dataset, tmp_path, monkeypatch):
    """As data.path and checkpoint.path are: the block tells runs apart from any directory."""
    from model.backbone import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(tmp_path / "mine")
    tokenizer.save_pretrained(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    args = ["--base", "mine", "--no-reasoning", "--limit", "1", "--dtype", "float32", "--json"]
    code, out = _eval("--data", str(tiny_dataset.path), *args)
    assert code == 0, out
    payload = _strict(out)
    assert payload["run"]["base"] == str(tmp_path / "mine")
    assert payload["model"] == "base mine without reasoning"  # the label as typed
    code, out = _eval("--data", str(tiny_dataset.path), *args[:1], "tiny", *args[2:])
    assert code == 0 and _strict(out)["run"]["base"] == "tiny", out


def test_the_code_commit_is_unknown_outside_a_git_checkout(monkeypatch):
    import subprocess

    from cli.common import code_commit

    here = code_commit()
    if (Path(code_commit.__code__.co_filename).parents[1] / ".git").exists():  # run from a checkout
        assert len(here["commit"]) == 40 and isinstance(here["dirty"], bool)
    else:  # an sdist, a copy
        assert here == {"commit": "unknown", "dirty": None}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert code_commit() == {"commit": "unknown", "dirty": None}


def test_a_dataset_dir_that_holds_prepared_protocols_is_pointed_at_them(tiny_dataset):
    code, out = _eval("--data", str(tiny_dataset.path.parent), "--baseline", "pop")
    assert code == 2 and f"holds the prepared loo/; did you mean {tiny_dataset.path}?" in out


def test_notes_for_a_limit_past_the_split_and_for_the_train_split(tiny_dataset):
    n = len(tiny_dataset.split("test"))
    result = CliRunner().invoke(
        app, ["eval", "--data", str(tiny_dataset.path), "--baseline", "pop", "--limit", "999"]
    )
    assert result.exit_code == 0, result.output
    assert f"note: --limit 999 > the {n} samples in test; evaluating all {n}" in result.stderr
    result = CliRunner().invoke(
        app, ["eval", "--data", str(tiny_dataset.path), "--baseline", "pop", "--split", "train"]
    )
    assert result.exit_code == 0 and "note: --split train scores the samples" in result.stderr


def _trained_on(tmp_path: Path, tiny_dataset, dataset: dict, trained: bool = True) -> Path:
    """A tiny checkpoint whose r2ec.json says it was trained on `dataset` (untrained: made on it)."""
    out = tmp_path / "ckpt"
    create_base_checkpoint(out, "tiny", tiny_dataset.items, dtype="float32", progress=False, dataset=dataset)
    if trained:
        meta = json.loads((out / "r2ec.json").read_text())
        (out / "r2ec.json").write_text(json.dumps(meta | {"train": {"step": 1}}))
    return out


def _eval_warnings(tiny_dataset, ckpt: Path) -> str:
    args = ["eval", "--data", str(tiny_dataset.path), "--checkpoint", str(ckpt), "--dtype", "float32"]
    result = CliRunner().invoke(app, [*args, "--no-reasoning", "--limit", "1", "--json"])
    assert result.exit_code == 0, result.output
    _strict(result.stdout)  # stdout stays the JSON alone
    return result.stderr


def test_a_checkpoint_trained_on_another_split_protocol_is_warned_of(tiny_dataset, tmp_path):
    dataset = {"name": tiny_dataset.name, "protocol": "temporal"}
    stderr = _eval_warnings(tiny_dataset, _trained_on(tmp_path / "a", tiny_dataset, dataset))
    assert "warning: checkpoint" in stderr and "trained on tiny/temporal, --data is tiny/loo" in stderr
    # an untrained checkpoint has no training data to hold this split's targets
    stderr = _eval_warnings(tiny_dataset, _trained_on(tmp_path / "b", tiny_dataset, dataset, trained=False))
    assert "warning" not in stderr


def test_a_checkpoint_trained_on_another_preparation_of_the_same_data_is_warned_of(tiny_dataset, tmp_path):
    """Same name and protocol, other samples (a retrain's rebuild with newer events): the
    samples' digest tells them apart; the same preparation is not warned of."""
    same = tiny_dataset.describe()
    assert "warning" not in _eval_warnings(tiny_dataset, _trained_on(tmp_path / "a", tiny_dataset, same))
    other = same | {"samples_sha256": "0" * 64, "path": "/elsewhere/loo"}
    stderr = _eval_warnings(tiny_dataset, _trained_on(tmp_path / "b", tiny_dataset, other))
    assert "trained on another preparation of tiny/loo (/elsewhere/loo)" in stderr


def test_sasrec_under_json_shows_its_training_on_stderr(tiny_dataset):
    args = [
        "eval",
        "--data",
        str(tiny_dataset.path),
        "--baseline",
        "sasrec",
        "--sasrec-epochs",
        "1",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train sasrec" in result.stderr
    payload = _strict(result.stdout)
    assert (
        payload["run"]["baseline"] == {"name": "sasrec", "epochs": 1}
        and payload["model"] == "sasrec (epochs 1)"
    )


def test_by_mask_has_standard_errors_and_the_text_output_shows_it(tiny_dataset):
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop", "--json")
    assert code == 0, out
    payload = _strict(out)
    assert set(payload["by_mask_stderr"]) == {"seen", "prompt", "none"}
    assert payload["by_mask_stderr"]["seen"] == payload["stderr"]
    code, out = _eval("--data", str(tiny_dataset.path), "--baseline", "pop")
    seen = payload["by_mask"]["seen"]["ndcg@10"], payload["by_mask_stderr"]["seen"]["ndcg@10"]
    assert code == 0 and f"ndcg@10 by mask: seen {seen[0]:.4f} ± {seen[1]:.4f}, prompt " in out


def test_eval_refuses_a_checkpoint_over_another_backbone_unless_allowed(tiny_dataset, tmp_path):
    """Other weights saved where the checkpoint's backbone was: refused naming both digests;
    --allow-backbone-mismatch evaluates it, with a warning and the check in the run block."""
    from model.backbone import tiny_model, tiny_tokenizer
    from tests.conftest import checkpoint_over_a_local_backbone

    ckpt, mine, meta = checkpoint_over_a_local_backbone(tiny_dataset.items, tmp_path)
    tokenizer = tiny_tokenizer()
    args = ["--data", str(tiny_dataset.path), "--checkpoint", str(ckpt), "--dtype", "float32", "--limit", "2"]
    args += ["--no-reasoning", "--json"]
    code, out = _eval(*args)
    assert code == 0, out
    assert _strict(out)["run"]["checkpoint"]["backbone"] == {
        "status": "match",
        "loaded": f"sha256:{meta['backbone']['sha256']}",
    }
    tiny_model(tokenizer, seed=4).save_pretrained(mine)
    code, out = _eval(*args)
    assert code == 2 and meta["backbone"]["sha256"] in out and "--allow-backbone-mismatch" in out, out
    result = CliRunner().invoke(app, ["eval", *args, "--allow-backbone-mismatch"])
    assert result.exit_code == 0, result.output
    assert _strict(result.stdout)["run"]["checkpoint"]["backbone"]["status"] == "mismatch_allowed"
    assert "loaded over another backbone" in result.stderr
