"""deploy/k8s: plain YAML that parses, wires names together, and runs real r2ec commands on the
port and paths the image and the compose file use."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.helpers import ROOT, check_r2ec, dockerfile_instructions, option_value, r2ec_invocations

K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _by_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_specs(docs) -> dict[str, dict]:
    specs = {}
    for d in docs:
        match d["kind"]:
            case "Deployment" | "Job":
                specs[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
            case "CronJob":
                specs[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def _exposed_port() -> int:
    return int(next(a for w, a in dockerfile_instructions() if w == "EXPOSE"))


def test_kustomization_lists_every_manifest_and_the_kinds_are_there(docs):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "CronJob", "PersistentVolumeClaim", "ConfigMap", "Job"} <= kinds
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"].startswith("r2ec")


def test_api_probes_port_and_service(docs):
    (deploy,) = _by_kind(docs, "Deployment").values()
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (api,) = pod["spec"]["containers"]
    (serve,) = r2ec_invocations(api["command"])
    assert check_r2ec(serve) == ("serve",)
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports["http"] == int(option_value(serve, "--port")) == _exposed_port()
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["resources"]["requests"]["cpu"] and api["resources"]["limits"]["memory"]
    # a pause while the Service drops the pod, then the drain, all before the kill
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][-1])
    (config,) = _by_kind(docs, "ConfigMap").values()
    drain = float(config["data"]["R2EC_SHUTDOWN_GRACE_S"])
    assert pause >= 5 and pod["spec"]["terminationGracePeriodSeconds"] >= pause + drain + 5
    # the admin API's key from a Secret the operator makes (optional: without it admin is off)
    assert all(spec["enableServiceLinks"] is False for spec in _pod_specs(docs).values())
    (key,) = [e for e in api["env"] if e["name"] == "R2EC_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    (svc,) = _by_kind(docs, "Service").values()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports) | set(ports.values())


def test_cronjob_retrains_on_the_init_jobs_dataset_one_at_a_time(docs):
    (cron,) = _by_kind(docs, "CronJob").values()
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5
    (container,) = _pod_specs(docs)[cron["metadata"]["name"]]["containers"]
    (retrain,) = r2ec_invocations(container["command"])
    assert check_r2ec(retrain) == ("retrain",)
    assert option_value(retrain, "--every-minutes") is None  # the CronJob is the scheduler
    assert (ROOT / option_value(retrain, "--config")).is_file()
    (init,) = _by_kind(docs, "Job").values()
    (init_container,) = init["spec"]["template"]["spec"]["containers"]
    calls = {check_r2ec(argv): argv for argv in r2ec_invocations(init_container["command"])}
    assert set(calls) == {("data", "prepare", "ml-100k"), ("checkpoint", "init")}
    assert option_value(calls["checkpoint", "init"], "--data") == option_value(retrain, "--data")


def test_volumes_claims_and_config_fit_together(docs):
    claims, maps = _by_kind(docs, "PersistentVolumeClaim"), _by_kind(docs, "ConfigMap")
    assert "r2ec-checkpoints" in claims
    (config,) = maps.values()
    env = config["data"]
    used_claims = set()
    for name, spec in _pod_specs(docs).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["image"] == "r2ec-serve:latest"
            assert {ref["configMapRef"]["name"] for ref in c["envFrom"]} <= set(maps)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert set(mounts.values()) <= set(volumes), name
            checkpoints = volumes[mounts[env["R2EC_CHECKPOINT"]]]  # the versions root is mounted
            assert checkpoints["persistentVolumeClaim"]["claimName"] == "r2ec-checkpoints", name
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                used_claims.add(v["persistentVolumeClaim"]["claimName"])
    assert used_claims == set(claims)
    assert float(env["R2EC_WATCH_INTERVAL_S"]) > 0 and env["R2EC_REDIS_URL"].startswith("redis://")
    api = next(d for d in docs if d["kind"] == "Deployment")
    # the drain (service/server.py: grace + 5 s) ends before the kubelet's SIGKILL
    assert (
        api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        >= float(env["R2EC_SHUTDOWN_GRACE_S"]) + 10
    )
