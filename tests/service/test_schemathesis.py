"""schemathesis over the live service (issue 13 row I): every phase, every check, >= 50 examples
per operation, the admin key given. Opt-in (R2EC_TEST_SCHEMATHESIS=1): about a minute of
fuzzing. A failure prints schemathesis' report, with a curl line per failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port, serve_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "schemathesis-admin-key"

pytestmark = pytest.mark.skipif(
    os.environ.get("R2EC_TEST_SCHEMATHESIS") != "1", reason="opt-in: R2EC_TEST_SCHEMATHESIS=1"
)


def schemathesis_command(url: str, key: str) -> list[str]:
    """The run BENCHMARKS.md reports (there with the URL and key of a hand-started server)."""
    exe = shutil.which("schemathesis") or "schemathesis"
    return [
        exe, "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
        "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "50", "--header", f"X-API-Key: {key}", "--workers", "1", "--no-color",
    ]  # fmt: skip


@pytest.mark.parametrize("client_key", ["", "fuzz-client"], ids=["user-routes-open", "client-key-set"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tiny_ckpt, tmp_path, client_key):
    """With R2EC_CLIENT_KEY set the schema asks for a key on the routes of users' data, and
    the ignored-auth check sends requests without it (the admin key in --header opens them)."""
    pytest.importorskip("schemathesis")
    ckpt = tmp_path / "ckpt"  # admin calls edit items: a private copy
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("index"))
    port = free_port()
    env = serve_env(
        ckpt,
        api_key=KEY,
        client_key=client_key,
        max_reasoning_tokens="8",
        reasoning_token_limit="32",  # fuzzed budgets stay cheap
        log_level="WARNING",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited while starting"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        run = subprocess.run(
            schemathesis_command(url, KEY), cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
    finally:
        server.terminate()
        server.wait(60)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "Coverage" in report and "Fuzzing" in report and "Stateful" in report, report[-3000:]
    print(report[report.find("SUMMARY") :])
