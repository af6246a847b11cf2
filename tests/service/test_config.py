"""R2EC_ variables: a typo is named at startup, not silently ignored."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pydantic
import pytest

from service.app import create_app
from service.config import RETIRED, Settings, unknown_env

ROOT = Path(__file__).resolve().parents[2]


def test_a_variable_nothing_reads_is_named_with_the_setting_it_may_mean():
    env = {"R2EC_INDEX_HNSW_EF_SEARCH": "512", "R2EC_MAX_BATCH": "4", "R2EC_TEST_X": "1", "PATH": "/bin"}
    assert unknown_env(env) == [
        "R2EC_INDEX_HNSW_EF_SEARCH is not a setting and is ignored (did you mean R2EC_INDEX_EF_SEARCH?)"
    ]
    assert unknown_env({"R2EC_HOST": "0.0.0.0", "R2EC_CACHE_DIR": "/c"}) == []  # read by r2ec serve, model/
    # what Kubernetes sets for a Service named r2ec-api (the manifests turn it off; other
    # manifests may not): not settings, not typos
    links = ["R2EC_API_SERVICE_HOST", "R2EC_API_SERVICE_PORT", "R2EC_API_SERVICE_PORT_HTTP", "R2EC_API_PORT"]
    links += ["R2EC_API_PORT_80_TCP", "R2EC_API_PORT_80_TCP_ADDR", "R2EC_API_PORT_80_TCP_PROTO"]
    assert unknown_env(dict.fromkeys(links, "x")) == []
    named_service = [n.replace("R2EC_API", "R2EC_API_SERVICE") for n in links]  # r2ec-api-service
    assert unknown_env(dict.fromkeys(named_service, "x")) == []
    # without their Service's _SERVICE_HOST beside them, such names are typos like any other
    assert unknown_env({"R2EC_HSOT_PORT": "8080"}) == [
        "R2EC_HSOT_PORT is not a setting and is ignored (did you mean R2EC_HOST_PORT?)"
    ]


def test_a_retired_variable_is_named_with_its_successor_not_a_look_alike():
    """R2EC_PREFIX_CACHE, set by operators of early 0.1.0 builds, was taken for a typo of
    R2EC_KERNEL_CACHE (the bf16 kernel's directory): its successor is R2EC_EXACT_DECODE, with the
    opposite sense (journey 39, F5)."""
    [line] = unknown_env({"R2EC_PREFIX_CACHE": "true"})
    assert line.startswith("R2EC_PREFIX_CACHE is not a setting and is ignored: ")
    assert "R2EC_EXACT_DECODE replaced it" in line and "R2EC_KERNEL_CACHE" not in line
    assert "exact_decode" in Settings.model_fields  # the successor is a setting


def test_the_app_warns_of_them_when_built(monkeypatch, caplog):
    monkeypatch.setenv("R2EC_PREFIX_CACHE", "false")
    with caplog.at_level(logging.WARNING, logger="service"):
        create_app(Settings())
    assert any("R2EC_PREFIX_CACHE is not a setting" in r.getMessage() for r in caplog.records)


def test_every_variable_the_repo_tells_users_to_set_is_read():
    """Scripts, manifests, the README and the docs name only variables something reads."""
    paths = [*ROOT.glob("deploy/**/*"), *ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "Dockerfile"]
    paths += [ROOT / "docker-compose.yml", *ROOT.glob("service/*.py"), *ROOT.glob("model/**/*.py")]
    named = set()
    for path in paths:  # (service/config.py names a typo as its example)
        if path.is_file() and path.suffix != ".png" and path.name != "config.py":
            named |= set(re.findall(r"\bR2EC_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="ignore")))
    assert len(named) > 10
    named -= RETIRED.keys()  # docs/operations.md, "Upgrading", says what replaced them
    assert [line for name in sorted(named) for line in unknown_env({name: ""})] == []


def test_the_variant_is_a_short_plain_label_or_empty(monkeypatch):
    """R2EC_VARIANT names an experiment's arm in a header and a metric label (journey 40, F2)."""
    import pytest
    from pydantic import ValidationError

    assert Settings().variant == ""
    monkeypatch.setenv("R2EC_VARIANT", "candidate-2026.12_b")
    assert Settings().variant == "candidate-2026.12_b"
    for bad in ("-x", "a b", "arm/1", "x" * 33, "é", "a\nb"):
        monkeypatch.setenv("R2EC_VARIANT", bad)
        with pytest.raises(ValidationError, match="R2EC_VARIANT must be"):
            Settings()


def test_the_exposure_log_is_off_by_default_and_needs_redis_and_a_bound():
    """R2EC_EXPOSURE_LOG=redis writes r2ec:served (service/exposure.py): without a Redis, or with
    neither a length nor an age cap, the service refuses to start rather than log nothing or
    fill Redis."""
    assert Settings().exposure_log == "off"
    with pytest.raises(pydantic.ValidationError, match="needs R2EC_REDIS_URL"):
        Settings(exposure_log="redis")
    with pytest.raises(pydantic.ValidationError, match="grow without bound"):
        Settings(exposure_log="redis", redis_url="redis://x", exposure_maxlen=0)
    assert Settings(exposure_log="redis", redis_url="redis://x", exposure_maxlen=0, exposure_retention_s=60)


def test_a_refused_setting_does_not_print_the_others_values():
    """A model-wide check (here max_queue < max_batch) used to print every setting read, with
    R2EC_REDIS_URL's password near the end of the truncated dict: `r2ec serve`'s one-line error
    (journey 41)."""
    with pytest.raises(pydantic.ValidationError) as refused:
        Settings(max_queue=2, max_batch=16, redis_url="redis://r2ec:TOPSECRETPASSWORD@cache.example:6379/0")
    text = str(refused.value)
    assert "raise R2EC_MAX_QUEUE" in text
    assert "SECRET" not in text and "PASSWORD" not in text and "cache.example" not in text
