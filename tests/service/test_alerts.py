"""deploy/prometheus/alerts.yml: promtool accepts the rules and their unit tests, and every
series they read is one the service exports (promtool cannot know: a rule on a misspelt metric
loads as healthy and never fires)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import IN_CI
from tests.service.conftest import app_for, serve
from tests.service.test_admin import copy_as_new_version

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
HISTOGRAM_PARTS = re.compile(r"_(bucket|count|sum)$")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:  # deploy/setup.sh --dev installs it: CI must not skip
            pytest.fail("promtool not found: deploy/setup.sh --dev installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus; deploy/setup.sh --dev does)")
    return path


@pytest.mark.parametrize("args", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts-test.yml"]])
def test_promtool_accepts_the_rules_and_their_tests(args):
    done = subprocess.run([_promtool(), *args], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _series_read_by_the_rules() -> set[str]:
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"].startswith("docs/operations.md#")
            for name in re.findall(r"\b([a-z][a-z0-9_]*)(?=\{|\[|\s|\)|$)", rule["expr"]):
                if name.startswith(("r2ec_", "process_")) or name in PROMETHEUS_OWN:
                    names.add(HISTOGRAM_PARTS.sub("", name))
    return names - PROMETHEUS_OWN


@pytest.mark.redis  # the event stream's series come from Redis
@pytest.mark.asyncio
async def test_every_series_the_rules_read_is_exported(ckpt, tmp_path, redis_url):
    root = tmp_path / "versions"
    copy_as_new_version(ckpt, root / "one", "w1")
    (root / "CURRENT").write_text("one")
    (root / "retrain").mkdir()
    at = "2026-12-07T10:00:00+00:00"  # as model/retrain.py writes a published run
    last = {"status": "published", "finished_at": at, "events_lost": 0, "events_lost_exact": True}
    texts = {"texts": 200, "loop_share": 0.0, "unknown_title_share": 0.0, "claims_hold_share": 1.0}
    last["text_gate"] = {"checked": True, "passed": True, "candidate": texts, "current": texts, "failed": []}
    state = {"last_run": last, "last_published_at": at, "stream_mark": {"entries_added": 0, "erased": 0}}
    (root / "retrain" / "state.json").write_text(json.dumps(state))
    async with serve(app_for(root, watch_interval_s=0.05, redis_url=redis_url)) as client:
        text = (await client.get("/metrics")).text
    exported = {family.name for family in text_string_to_metric_families(text)}
    exported |= {f"{name}_total" for name in exported}  # the parser names counters without _total
    read = _series_read_by_the_rules()
    assert {"r2ec_store_up", "r2ec_model_outdated", "process_resident_memory_bytes"} <= read
    assert read - exported == set()


def test_the_runbook_has_a_section_for_every_alert():
    runbook = (RULES.parents[1] / "docs" / "operations.md").read_text()
    anchors = {
        "docs/operations.md#" + re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)
    }
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    urls = {r["annotations"]["runbook_url"] for g in rules["groups"] for r in g["rules"]}
    assert urls - anchors == set()
