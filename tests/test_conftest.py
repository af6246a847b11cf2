"""The suite's own helpers (tests/conftest.py): how CI is read, and what a fresh Python process
started by a test imports (journey 40, F5 and F6)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env, in_ci

TESTS = ROOT / "tests"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), (" Yes ", True), ("false", False), ("0", False)]
    + [("", False), ("no", False), (None, False)],
)
def test_ci_is_true_only_for_1_true_or_yes(value, expected):
    assert in_ci({} if value is None else {"CI": value}) is expected


def test_no_test_reads_the_ci_variable_but_through_in_ci():
    """CI=false made the promtool tests fail where the Redis ones skipped: one test module read
    any non-empty value as CI."""
    direct = re.compile(r"""environ\.get\(\s*["']CI["']|environ\[\s*["']CI["']|getenv\(\s*["']CI["']""")
    readers = [
        str(p.relative_to(ROOT)) for p in TESTS.rglob("*.py") if direct.search(p.read_text(encoding="utf-8"))
    ]
    assert readers == ["tests/conftest.py"]


def test_a_child_imports_this_checkout_from_any_working_directory(tmp_path):
    """Another checkout in the child's working directory (or the editable install's) must not
    be the one a test's subprocess imports."""
    other = tmp_path / "cli"
    other.mkdir()
    (other / "__init__.py").write_text("")
    code = "import cli, model; print(cli.__file__); print(model.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [str(ROOT / "cli" / "__init__.py"), str(ROOT / "model" / "__init__.py")]


def test_every_test_that_starts_python_uses_child_env():
    """A test module that starts `sys.executable` (an argv list that begins with it) sets its
    environment with child_env (or tests/service/conftest.py's serve_env, built on it)."""
    starts = re.compile(r"\[\s*sys\.executable\b")
    missing = [
        str(p.relative_to(ROOT))
        for p in TESTS.rglob("*.py")
        if p.name != "conftest.py"
        and starts.search(text := p.read_text(encoding="utf-8"))
        and "child_env(" not in text
        and "serve_env(" not in text
    ]
    assert missing == []


def test_the_warning_the_project_silences_is_silenced_in_the_tests_too():
    """model/checkpoint.py filters transformers' FutureWarning at import, which pytest undoes
    after the test that imported it: pyproject's filterwarnings carries the same filter."""
    import tomllib
    import warnings

    own = re.search(
        r'warnings\.filterwarnings\("ignore", message="([^"]+)", category=FutureWarning\)',
        (ROOT / "model" / "checkpoint.py").read_text(encoding="utf-8"),
    )
    assert own is not None
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"][
        "ini_options"
    ]
    assert f"ignore:{own[1]}:FutureWarning" in ini["filterwarnings"]
    text = (  # transformers' own words (modeling_utils.py)
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. "
        "Use `is_activation_checkpointing` instead."
    )
    with warnings.catch_warnings(record=True) as caught:  # under the filters pytest set for this test
        warnings.warn(text, FutureWarning, stacklevel=1)
    assert caught == []
