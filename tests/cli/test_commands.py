"""Every command answers --help; train and retrain build RecPOConfig the same way from
the config file, the shorthand options and `--set FIELD=VALUE`."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import typing

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cli import app
from cli._env import command
from cli.overrides import parse_sets, recpo_config
from model.recpo import RecPOConfig
from tests.conftest import child_env


def _command_paths(cmd: typer.core.TyperGroup, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += _command_paths(sub, (*path, name))
    return found


def test_every_command_has_help():
    paths = _command_paths(typer.main.get_command(app))
    assert {p[0] for p in paths if p} == {
        "data",
        "checkpoint",
        "eval",
        "recommend",
        "train",
        "serve",
        "retrain",
        "user",
        "exposures",
    }
    assert ("data", "prepare", "ml-100k") in paths and ("checkpoint", "show") in paths
    assert ("user", "erase") in paths and ("exposures", "export") in paths
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)


def test_set_values_are_read_as_the_fields_types():
    got = parse_sets(
        [
            "lora_r=8",
            "learning_rate=5e-5",  # YAML alone would read this as a string
            "lora_layers=null",
            "lora=false",
            "time_budget_minutes=3",
            "system_prompt=You recommend: movies.",
            "lora_target_modules=q_proj,v_proj",
        ],
        RecPOConfig,
    )
    assert got == {
        "lora_r": 8,
        "learning_rate": 5e-5,
        "lora_layers": None,
        "lora": False,
        "time_budget_minutes": 3.0,
        "system_prompt": "You recommend: movies.",
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    assert isinstance(got["time_budget_minutes"], float)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("lora_rank=8", "RecPOConfig has no field 'lora_rank'; fields: stage, lora, lora_r,"),
        ("lora_r", "--set wants FIELD=VALUE, got 'lora_r'"),
        ("lora_r=1.5", "lora_r takes int, got '1.5'"),
        ("lora_layers=all", "lora_layers takes int | None, got 'all'"),
        ("learning_rate=fast", "learning_rate takes float, got 'fast'"),
    ],
)
def test_bad_set_pairs_name_the_problem(pair, message):
    with pytest.raises(ValueError, match="^--set ") as info:
        parse_sets([pair], RecPOConfig)
    assert message in str(info.value)


def test_literal_fields_take_one_of_their_values():
    @dataclasses.dataclass
    class Cfg:
        stage: typing.Literal["recpo", "contrastive"] = "recpo"
        width: typing.Literal[1, 2] | None = 1

    assert parse_sets(["stage=contrastive", "width=2"], Cfg) == {"stage": "contrastive", "width": 2}
    assert parse_sets(["width=null"], Cfg) == {"width": None}
    with pytest.raises(ValueError, match="stage takes typing.Literal\\['recpo', 'contrastive'\\], got 'rl'"):
        parse_sets(["stage=rl"], Cfg)


def test_every_field_is_listed_in_the_unknown_field_error():
    with pytest.raises(ValueError) as info:
        parse_sets(["nope=1"], RecPOConfig)
    assert all(f.name in str(info.value) for f in dataclasses.fields(RecPOConfig))


def test_config_file_then_shorthands_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 10, "eval_limit": 50, "lora_r": 4}))
    cfg = recpo_config(path, ["eval_limit=null", "lora_r=2"], max_steps=7, stage=None)
    assert (cfg.max_steps, cfg.eval_limit, cfg.lora_r, cfg.stage) == (7, None, 2, "recpo")
    assert recpo_config(None, None, max_steps=None) == RecPOConfig()
    with pytest.raises(ValueError, match="max_steps is given twice"):
        recpo_config(None, ["max_steps=3"], max_steps=5)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):  # RecPOConfig's own check
        recpo_config(path, ["num_generations=1"])


@pytest.mark.parametrize(
    ("command", "target", "pick"),
    [
        (["train", "--out", "run", "--stage", "contrastive"], "model.train.train", lambda a: a[0]),
        (["retrain"], "model.retrain.retrain", lambda a: a[0].train),
    ],
)
def test_train_and_retrain_pass_the_overrides_on(monkeypatch, tiny_dataset, command, target, pick):
    seen = []

    def fake(*args, **kwargs):
        seen.append(pick(args))
        raise ValueError("stop here")  # reported like any config error: exit 2

    monkeypatch.setattr(target, fake)
    args = [*command, "--data", str(tiny_dataset.path), "--max-steps", "3", "--set", "lora_r=2"]
    result = CliRunner().invoke(app, [*args, "--set", "time_budget_minutes=0.5"])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    (cfg,) = seen
    assert (cfg.max_steps, cfg.lora_r, cfg.time_budget_minutes) == (3, 2, 0.5)

    result = CliRunner().invoke(app, [*command, "--data", str(tiny_dataset.path), "--set", "bogus=1"])
    assert result.exit_code == 2 and "has no field 'bogus'" in result.output
    assert len(seen) == 1  # a bad --set stops before any work


def test_the_subcommand_is_read_before_typer_parses_argv():
    assert command(["serve", "--port", "1"]) == "serve"
    assert command(["--log-level", "DEBUG", "serve"]) == "serve"
    assert command(["--log-level=DEBUG", "eval", "--data", "x"]) == "eval"
    assert command(["--help"]) is None


def _spincount(*argv: str, **env: str) -> str:
    """GOMP_SPINCOUNT once `r2ec ARGV` has imported cli/main.py, in a fresh interpreter, and
    whether torch was already loaded when cli/_env.py decided (libgomp reads it only once)."""
    code = (
        "import sys, os; sys.argv = ['r2ec', *sys.argv[1:]]; import cli._env; "
        "loaded = 'torch' in sys.modules; import cli.main; "
        "print(os.environ.get('GOMP_SPINCOUNT'), loaded)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env=child_env(clean, **env),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_the_options_read_before_typer_are_every_valued_option_of_r2ec():
    """cli/_env.py skips the value of each of r2ec's own valued options to find the command: a
    new one must be added there too, or its value is taken for the command."""
    from typer.main import get_command

    from cli import app
    from cli._env import VALUED

    params = get_command(app).params
    assert {o for p in params if not getattr(p, "is_flag", False) for o in p.opts} == VALUED


def test_serve_lets_openmp_spin_and_other_commands_do_not():
    import model

    assert _spincount("serve", "--help") == f"{model.SERVE_SPINCOUNT} False"
    assert _spincount("--log-level", "INFO", "serve") == f"{model.SERVE_SPINCOUNT} False"
    # the README's form of JSON logs: "json" was taken for the command, and serve did not spin
    assert _spincount("--log-format", "json", "serve") == f"{model.SERVE_SPINCOUNT} False"
    assert _spincount("--log-format=json", "serve") == f"{model.SERVE_SPINCOUNT} False"
    assert _spincount("eval", "--help") == "None False"
    assert _spincount("serve", GOMP_SPINCOUNT="0") == "0 False"  # the user's choice is kept


@pytest.mark.parametrize("command", ["train", "retrain"])
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage: [\n", r"not valid YAML: .* \(line 2, column 1\)"),  # a Rich traceback before
        ("- a\n- b\n", "holds a list, not FIELD: VALUE lines"),  # was "unknown config keys ['a', 'b']"
        ("just words\n", "holds a str, not FIELD: VALUE lines"),
        ("max_stepz: 3\n", r"unknown config keys \['max_stepz'\]"),
        (None, "no such file"),  # was "[Errno 2] No such file or directory: ..." without the option
        (b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_a_bad_config_file_is_one_error_line_naming_the_option(
    tmp_path, tiny_dataset, command, text, message
):
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    args = [command, "--data", str(tiny_dataset.path), "--config", str(path)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")] if command == "train" else args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --config {path}: "), result.output
    assert re.search(message, lines[0]), lines[0]


def test_train_refuses_an_out_that_holds_a_run_in_one_line(tmp_path, tiny_dataset, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1}\n')
    args = ["train", "--data", str(tiny_dataset.path), "--out", str(run), "--base", "tiny"]
    args += ["--stage", "contrastive", "--max-steps", "1", "--set", "eval_limit=1", "--set", "dtype=float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {run} already holds a run (log.jsonl)") and "--overwrite" in line
    assert (run / "log.jsonl").read_text() == '{"step": 1}\n'
    result = CliRunner().invoke(app, [*args, "--resume", "--overwrite"])
    assert result.exit_code == 2 and "--resume and --overwrite" in result.output, result.output
    seen = []
    monkeypatch.setattr("model.train.train", lambda *a, **k: seen.append(k) or run / "best")
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert seen == [{"resume": False, "overwrite": True}]


@pytest.mark.parametrize(("interrupt_at", "saved"), [(4, True), (2, False)])
def test_ctrl_c_in_train_says_how_to_continue(tmp_path, tiny_dataset, monkeypatch, interrupt_at, saved):
    from model.train import Trainer

    real = Trainer.step

    def step_or_interrupt(self):
        if self.state.step == interrupt_at - 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "step", step_or_interrupt)
    run = tmp_path / "my run"
    args = ["train", "--data", str(tiny_dataset.path), "--out", str(run), "--base", "tiny"]
    args += ["--stage", "contrastive", "--max-steps", "5", "--set", "save_every=2", "--set", "dtype=float32"]
    args += ["--overwrite"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/r2ec", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if "interrupted" in line]
    assert len(lines) == 1, result.output
    shown = [a for a in args if a != "--overwrite"]
    if saved:
        assert lines[0].startswith(f"interrupted after step 3; {run / 'last'} holds step 2: continue with: ")
        assert lines[0].endswith(f"r2ec {shlex.join([*shown, '--resume'])}")
    else:
        assert lines[0].startswith("interrupted after step 1, before the first save (step 2): nothing")
        assert lines[0].endswith(f"r2ec {shlex.join([*shown, '--overwrite'])}")
    assert (run / "curves.png").is_file()


def test_sigterm_in_train_stops_as_ctrl_c_does(tmp_path, tiny_dataset, monkeypatch):
    """A scheduler's preemption (SIGTERM) gets the curves and the resume line, exit 143, and
    the process's own SIGTERM handling is back afterwards."""
    import os
    import signal

    from model.train import Trainer

    real = Trainer.step

    def step_or_terminate(self):
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(Trainer, "step", step_or_terminate)
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_dataset.path), "--out", str(run), "--base", "tiny"]
    args += ["--stage", "contrastive", "--max-steps", "6", "--set", "save_every=2", "--set", "dtype=float32"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/r2ec", *args])
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 143, result.output
    (line,) = [line for line in result.output.splitlines() if "interrupted" in line]
    said = f"interrupted (SIGTERM) after step 3; {run / 'last'} holds step 2: continue with: r2ec "
    assert line.startswith(said)
    assert (run / "curves.png").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("by", ["SIGTERM", "SIGINT"])
def test_a_stop_while_train_sets_up_exits_as_that_signal(tmp_path, tiny_dataset, monkeypatch, by):
    """Before the first step (the model and item table loading, minutes on the real backbone)
    a SIGTERM exits 143 with a line saying so; Ctrl-C stays 130."""
    import os
    import signal

    from model.train import Trainer

    def setup(self, *args, **kwargs):
        if by == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "__init__", setup)
    args = ["train", "--data", str(tiny_dataset.path), "--out", str(tmp_path / "run"), "--base", "tiny"]
    result = CliRunner().invoke(app, args)
    if by == "SIGTERM":
        assert result.exit_code == 143, result.output
        said = "stopped (SIGTERM) while setting up, before the first step: run the command again"
        assert said in result.output, result.output
    else:
        assert result.exit_code == 130 and "stopped" not in result.output, result.output


def test_off_the_main_thread_a_training_error_is_not_chained_to_the_signal_refusal():
    import threading

    from cli.train import _sigterm_as_interrupt

    seen = []

    def run():
        try:
            with _sigterm_as_interrupt() as taken:
                raise RuntimeError("boom")
        except RuntimeError as exc:
            seen.append((exc.__context__, taken))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(None, [])]


def test_a_second_sigterm_while_the_run_stops_is_not_raised_again():
    """The first SIGTERM stops the run (KeyboardInterrupt); one more while it draws its curves
    and prints its resume line must not cut that short."""
    import os
    import signal

    from cli.train import _sigterm_as_interrupt

    with _sigterm_as_interrupt() as taken:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between two bytecodes
                pass
            raise AssertionError("SIGTERM did not interrupt")
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # while stopping: recorded, not raised
            for _ in range(1000):
                pass
    assert taken == [signal.SIGTERM, signal.SIGTERM]


def test_a_sigterm_long_after_the_first_raises_again(monkeypatch):
    """If the first interrupt was lost, a later SIGTERM still stops the run."""
    import os
    import signal

    from cli.train import _sigterm_as_interrupt

    monkeypatch.setattr("cli.train.REPEAT_S", 0.0)
    raised = 0
    with _sigterm_as_interrupt():
        for _ in range(2):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
            except KeyboardInterrupt:
                raised += 1
    assert raised == 2


def test_the_resume_line_names_torchrun_when_it_launched_the_run(monkeypatch):
    from cli.train import _launcher

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert _launcher() == "r2ec"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _launcher() == "torchrun --nproc_per_node 2 -m cli"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert _launcher() == "torchrun --nnodes 4 ... --nproc_per_node 2 -m cli"
