"""The shipped cluster definitions are valid and agree with the job configs (fast: no Ray started).

* Launcher configs (cluster/aws.yaml, cluster/gcp.yaml) validate against the JSON schema that ships inside
  the installed `ray` package, raw and after the defaults `ray up` merges in; broken copies fail.
* KubeRay manifests (cluster/kuberay/*.yaml) have the fields the operator requires, autoscaling on, and
  are read by Ray's own KubeRay-to-autoscaler translation (which validates its result against the same
  schema), so the autoscaler sees the node types, GPUs and custom resources they declare.
* Every scorer/embedder actor that a GPU job config asks for fits a worker type of every cluster, and
  every custom node-type resource is asked for by some job (else that node type could never start).
* No secrets, and no dashboard exposed beyond loopback / ClusterIP.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from deita_ray.config import ResourcesConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
GPU_JOBS = sorted((REPO / "jobs").glob("*gpu*.yaml"))
WORKER_TYPES = ("gpu_scorer", "gpu_embedder", "cpu_ingest")
STANDARD_RESOURCES = {"CPU", "GPU", "TPU", "memory", "object_store_memory"}
# Resources Ray adds to real nodes by itself; a request for one needs no node-type declaration.
AUTOMATIC_RESOURCE = re.compile(r"^(accelerator_type:|node:)")


def ray_schema() -> dict[str, Any]:
    path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    return json.loads(path.read_text())


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def header(path: Path) -> str:
    """The leading comment block."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


def ray_up_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it talks to the cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def kuberay_cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def kuberay_autoscaling_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The autoscaler config Ray derives from the manifest's RayCluster spec (validated by Ray)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"},
          "spec": copy.deepcopy(kuberay_cluster_spec(manifest))}
    return _derive_autoscaling_config_from_ray_cr(cr)


def cluster_node_types() -> dict[str, dict[str, dict[str, Any]]]:
    """Worker node types (resources, max_workers) of every shipped cluster, in autoscaler terms."""
    clusters = {}
    for path in LAUNCHERS:
        config = load(path)
        clusters[path.name] = {name: node for name, node in config["available_node_types"].items()
                               if name != config["head_node_type"]}
    for path in KUBERAY:
        config = kuberay_autoscaling_config(load(path))
        clusters[f"kuberay/{path.name}"] = {
            name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"]}
    return clusters


def actor_requests(node: Any, where: str = "") -> list[tuple[str, ResourcesConfig]]:
    """Every ResourcesConfig block (a `resources` mapping with actor fields) in a job config, and each
    training section's worker group as one."""
    found = []
    if isinstance(node, dict) and "num_workers" in node and "resources_per_worker" in node:
        # A training config: its Ray Train workers are the actors (one GPU each with use_gpu).
        found.append((f"{where}.workers" if where else "workers", ResourcesConfig(
            actor_num_cpus=node.get("cpus_per_worker", 1), actor_num_gpus=1 if node.get("use_gpu") else 0,
            actor_resources=node["resources_per_worker"], min_actors=node["num_workers"],
            max_actors=node["num_workers"])))
        return found
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            fields = set(ResourcesConfig.model_fields) | {"scorer_num_cpus", "scorer_num_gpus", "scorer_env"}
            if key == "resources" and isinstance(value, dict) and set(value) & fields:
                found.append((path, ResourcesConfig.model_validate(value)))
            else:
                found.extend(actor_requests(value, path))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(actor_requests(value, f"{where}[{index}]"))
    return found


def demand(resources: ResourcesConfig) -> dict[str, float]:
    wanted = {"CPU": resources.actor_num_cpus, "GPU": resources.actor_num_gpus, **resources.actor_resources}
    return {name: amount for name, amount in wanted.items() if amount > 0}


def actors_per_node(node_resources: dict[str, float], wanted: dict[str, float]) -> int:
    """How many actors with resource demand `wanted` one node of this type holds."""
    per_node = math.inf
    for name, amount in wanted.items():
        if AUTOMATIC_RESOURCE.match(name):
            continue
        per_node = min(per_node, math.floor(node_resources.get(name, 0) / amount + 1e-9))
    return 0 if per_node == math.inf else int(per_node)


# --- launcher configs --------------------------------------------------------------------------------------


def test_cluster_files_exist():
    assert [p.name for p in LAUNCHERS] == ["aws.yaml", "gcp.yaml"]
    assert [p.name for p in KUBERAY] == ["raycluster.yaml", "rayjob.yaml"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    config = load(path)
    jsonschema.validate(config, ray_schema())  # the file as written
    prepared = ray_up_validate(config)  # and with the defaults `ray up` merges in
    assert prepared["available_node_types"].keys() == config["available_node_types"].keys()


BREAKAGES = {
    "misspelt top-level key": lambda c: c.update(idle_timeout_minute=5),
    "fractional node resource": lambda c: c["available_node_types"]["gpu_scorer"]["resources"].update(
        deita_scorer=0.5),
    "node type without node_config": lambda c: c["available_node_types"]["cpu_ingest"].pop("node_config"),
    "unknown node-type field": lambda c: c["available_node_types"]["gpu_embedder"].update(min_worker=0),
    "head type not declared": lambda c: c.update(head_node_type="missing"),
    "sum of min_workers above max_workers": lambda c: c.update(max_workers=0) or
        c["available_node_types"]["cpu_ingest"].update(min_workers=1),
}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_launcher_config_fails(path, breakage):
    config = load(path)
    BREAKAGES[breakage](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        jsonschema.validate(config, ray_schema())
        ray_up_validate(config)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_cluster_shape(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should keep its cores for the driver"
    workers = {name: node for name, node in types.items() if name != config["head_node_type"]}
    assert set(WORKER_TYPES) <= set(workers)
    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name} should scale from zero"
        assert node["max_workers"] >= 1, name
    assert sum(node["max_workers"] for node in workers.values()) <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 15
    for name in ("gpu_scorer", "gpu_embedder"):
        resources = workers[name]["resources"]
        assert resources["GPU"] >= 1, name
        custom = set(resources) - STANDARD_RESOURCES
        assert custom, f"{name} declares no custom resource for actors to target it"
        others = {r for other, node in workers.items() if other != name for r in node["resources"]}
        assert not custom & others, f"{name}'s custom resources are not unique to it"
    assert not set(workers["cpu_ingest"]["resources"]) - STANDARD_RESOURCES
    # Nodes run the same Ray as the client that launches them, and install this package with its extras.
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("deita_ray[gpu,index]" in command for command in config["setup_commands"])
    assert config["file_mounts"] and ".venv" in config["rsync_exclude"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_header_gives_the_commands(path):
    text = header(path)
    name = f"cluster/{path.name}"
    for command in (f"ray up {name}", f"ray dashboard {name}", "ray job submit --address http://127.0.0.1:8265",
                    f"ray down {name}"):
        assert command in text, f"{name}: header lacks `{command}`"
    for ref in re.findall(r"\b(?:jobs|cluster)/[\w./-]+\.ya?ml\b", text):
        assert (REPO / ref).is_file(), f"{name} header names {ref}, which does not exist"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_dashboard_stays_private(path):
    config = load(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # AWS: no inbound rules beyond Ray's default ones (intra-cluster traffic and SSH).
    assert not config["provider"].get("security_group", {}).get("IpPermissions")


# --- KubeRay manifests -------------------------------------------------------------------------------------


def kuberay_problems(manifest: dict[str, Any]) -> list[str]:
    """What a KubeRay manifest lacks (the operator's required fields, autoscaling, privacy), as messages."""
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(manifest.get("apiVersion") == "ray.io/v1", "apiVersion is not ray.io/v1")
    need(manifest.get("kind") in ("RayCluster", "RayJob"), "kind is not RayCluster or RayJob")
    need(bool(manifest.get("metadata", {}).get("name")), "metadata.name missing")
    spec = (manifest.get("spec") or {}).get("rayClusterSpec") if manifest.get("kind") == "RayJob" \
        else manifest.get("spec")
    if not isinstance(spec, dict):
        return problems + ["no RayCluster spec"]
    need(spec.get("enableInTreeAutoscaling") is True, "enableInTreeAutoscaling is not true")
    need((spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) > 0,
         "autoscalerOptions.idleTimeoutSeconds missing")
    head = spec.get("headGroupSpec") or {}
    need(head.get("serviceType") == "ClusterIP", "head serviceType is not ClusterIP (dashboard exposed)")
    need(not head.get("enableIngress"), "head enableIngress exposes the dashboard")
    need(isinstance(head.get("rayStartParams"), dict), "headGroupSpec.rayStartParams missing")
    containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    need(bool(containers[0].get("image")), "head group container has no image")
    groups = spec.get("workerGroupSpecs") or []
    need(bool(groups), "no workerGroupSpecs")
    for index, group in enumerate(groups):
        name = group.get("groupName") or f"workerGroupSpecs[{index}]"
        need(bool(group.get("groupName")), f"{name}: groupName missing")
        for field in ("replicas", "minReplicas", "maxReplicas"):
            need(isinstance(group.get(field), int), f"{name}: {field} missing")
        if all(isinstance(group.get(f), int) for f in ("replicas", "minReplicas", "maxReplicas")):
            need(group["minReplicas"] == 0, f"{name}: minReplicas is not 0 (no scale from zero)")
            need(group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] > 0,
                 f"{name}: replicas outside minReplicas..maxReplicas")
        need(isinstance(group.get("rayStartParams"), dict), f"{name}: rayStartParams missing")
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        need(bool(containers[0].get("image")), f"{name}: container has no image")
    return problems


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_required_fields(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(documents) == 1, "one object per manifest (no Service, Ingress or Secret alongside)"
    manifest = documents[0]
    assert kuberay_problems(manifest) == []
    assert manifest["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    spec = kuberay_cluster_spec(manifest)
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-scorer", "gpu-embedder", "cpu-ingest", "gpu-trainer"}
    for name, group in groups.items():
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
        limits = container["resources"]["limits"]
        # One GPU per scorer/embedder pod (one actor each); a trainer pod holds 8 Ray Train workers.
        gpus = 8 if name == "gpu-trainer" else 1 if name.startswith("gpu-") else 0
        assert limits.get("nvidia.com/gpu", 0) == gpus, name


def _groups(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return kuberay_cluster_spec(manifest)["workerGroupSpecs"]


def _head(manifest: dict[str, Any]) -> dict[str, Any]:
    return kuberay_cluster_spec(manifest)["headGroupSpec"]


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


KUBERAY_BREAKAGES = {
    "apiVersion is not ray.io/v1": lambda m: m.update(apiVersion="ray.io/v1alpha1"),
    "metadata.name missing": lambda m: m["metadata"].pop("name"),
    "enableInTreeAutoscaling is not true": lambda m: kuberay_cluster_spec(m).pop("enableInTreeAutoscaling"),
    "idleTimeoutSeconds missing": lambda m: kuberay_cluster_spec(m)["autoscalerOptions"].clear(),
    "head group container has no image": lambda m: _container(_head(m)).pop("image"),
    "serviceType is not ClusterIP": lambda m: _head(m).update(serviceType="LoadBalancer"),
    "groupName missing": lambda m: _groups(m)[0].pop("groupName"),
    "gpu-scorer: minReplicas missing": lambda m: _groups(m)[0].pop("minReplicas"),
    "gpu-embedder: maxReplicas missing": lambda m: _groups(m)[1].pop("maxReplicas"),
    "cpu-ingest: replicas missing": lambda m: _groups(m)[2].pop("replicas"),
    "gpu-scorer: minReplicas is not 0": lambda m: _groups(m)[0].update(minReplicas=1, replicas=1),
    "gpu-embedder: container has no image": lambda m: _container(_groups(m)[1]).pop("image"),
}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", KUBERAY_BREAKAGES)
def test_broken_kuberay_manifest_is_caught(path, breakage):
    manifest = load(path)
    KUBERAY_BREAKAGES[breakage](manifest)
    problems = kuberay_problems(manifest)
    assert any(breakage in problem for problem in problems), problems


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_spec_as_the_autoscaler_reads_it(path):
    config = kuberay_autoscaling_config(load(path))  # raises if Ray cannot read or validate it
    assert config["idle_timeout_minutes"] == pytest.approx(5.0)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    scorer, embedder, ingest = types["gpu-scorer"], types["gpu-embedder"], types["cpu-ingest"]
    assert (scorer["resources"]["GPU"], scorer["resources"]["deita_scorer"]) == (1, 1)
    assert (embedder["resources"]["GPU"], embedder["resources"]["deita_embedder"]) == (1, 1)
    assert "GPU" not in ingest["resources"] and ingest["resources"]["CPU"] >= 1
    assert all(node["min_workers"] == 0 for name, node in types.items() if name != "headgroup")


def test_rayjob_runs_the_pipeline_on_the_same_cluster():
    job = load(CLUSTER / "kuberay" / "rayjob.yaml")
    spec = job["spec"]
    assert spec["rayClusterSpec"] == load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"], \
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["deita-ray", "run"], spec["entrypoint"]
    files = [w for w in words if w.endswith((".yaml", ".yml", ".py", ".json"))]
    assert files, "the entrypoint names no config file"
    for name in files:
        assert (REPO / name).is_file(), f"the RayJob entrypoint references {name}, which is not in the repo"
    # The working_dir is the image's checkout (cluster/Dockerfile copies jobs/ there).
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {runtime_env['working_dir']}" in dockerfile
    assert "COPY --chown=ray:users jobs ./jobs" in dockerfile


# --- job configs <-> clusters ------------------------------------------------------------------------------


def test_gpu_job_configs_exist():
    assert GPU_JOBS, "no jobs/*gpu*.yaml to check the clusters against"


@pytest.mark.parametrize("job", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_job_actors_fit_every_cluster(job):
    requests = actor_requests(load(job))
    assert requests, f"{job.name} has no resources block"
    clusters = cluster_node_types()
    for where, resources in requests:
        wanted = demand(resources)
        if resources.actor_num_gpus:
            # Otherwise a scorer could land on (and launch) an embedder node, or the reverse.
            assert set(resources.actor_resources) - STANDARD_RESOURCES, \
                f"{job.name} {where}: a GPU actor should ask for its node type's custom resource"
        for cluster, types in clusters.items():
            for name in set(wanted) - STANDARD_RESOURCES:
                if not AUTOMATIC_RESOURCE.match(name):
                    assert any(name in node["resources"] for node in types.values()), \
                        f"{job.name} {where} asks for {name!r}, which no worker type of {cluster} offers"
            capacity = sum(node["max_workers"] * actors_per_node(node["resources"], wanted)
                           for node in types.values())
            assert capacity >= resources.max_actors, (
                f"{job.name} {where}: {cluster} holds at most {capacity} actors of {wanted}, "
                f"fewer than max_actors={resources.max_actors}")


def test_every_custom_node_resource_is_requested():
    requested = {name for job in GPU_JOBS for _, resources in actor_requests(load(job))
                 for name in resources.actor_resources}
    for cluster, types in cluster_node_types().items():
        for node_type, node in types.items():
            for name in set(node["resources"]) - STANDARD_RESOURCES:
                assert name in requested, (
                    f"{cluster}: {node_type} offers {name!r}, but no job in "
                    f"{[p.name for p in GPU_JOBS]} asks for it, so demand never launches that node type")


# --- secrets ------------------------------------------------------------------------------------------------

SECRET_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY|hf_[A-Za-z0-9]{30,}")
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def _env_entries(node: Any):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for value in node.values():
            yield from _env_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_entries(value)


def inline_secrets(text: str) -> list[str]:
    """Credentials written into a config: key-like values, cloud credential fields, and secret-named
    environment variables of a manifest that are set inline instead of from a Kubernetes Secret."""
    found = [f"credential-like value {m.group()[:8]}..." for m in SECRET_VALUE.finditer(text)]
    found += [f"credential field {m.group()}" for m in
              re.finditer(r"aws_(secret_)?access_key\w*|ssh_private_key\s*:", text, re.IGNORECASE)]
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        documents = []  # not YAML (Dockerfile)
    for document in documents:
        for entry in _env_entries(document):
            if SECRET_NAME.search(str(entry.get("name", ""))) and \
                    "secretKeyRef" not in (entry.get("valueFrom") or {}):
                found.append(f"env {entry.get('name')} not from a secretKeyRef")
    return found


@pytest.mark.parametrize("path", LAUNCHERS + KUBERAY + [CLUSTER / "Dockerfile"], ids=lambda p: p.name)
def test_no_inline_secrets(path):
    assert inline_secrets(path.read_text()) == []


def _inline_openai_key(text: str) -> str:
    manifest = yaml.safe_load(text)
    entry = next(e for e in _container(_head(manifest))["env"] if e["name"] == "OPENAI_API_KEY")
    entry.pop("valueFrom")
    entry["value"] = "placeholder"  # no key-like pattern: only the env check can catch it
    return yaml.safe_dump(manifest)


@pytest.mark.parametrize("edit", [
    _inline_openai_key,
    lambda t: t + "\n# aws_secret_access_key: abc\n",
    lambda t: t + "\n# key sk-proj-abcdefghijklmnopqrstuvwx\n",
    lambda t: t + "\n# token AKIAABCDEFGHIJKLMNOP\n",
], ids=["inline env value", "aws credential field", "openai key", "aws key id"])
def test_inline_secret_is_caught(edit):
    text = (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert inline_secrets(edit(text))


def test_openai_key_comes_from_a_secret_on_every_pod():
    spec = load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_local_autoscaling_cluster_config_is_valid():
    """The config tests/autoscaling_cluster.py hands Ray's monitor for the real autoscaling test."""
    from autoscaling_cluster import fake_cluster_config
    from ray.autoscaler._private.util import validate_config

    node = load(CLUSTER / "aws.yaml")["available_node_types"]["gpu_scorer"]
    custom = {k: v for k, v in node["resources"].items() if k not in STANDARD_RESOURCES}
    config = fake_cluster_config({"CPU": 1}, {"gpu_scorer": {
        "resources": {"CPU": 1, **custom}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
        gcs_address="127.0.0.1:1", idle_timeout_minutes=0.2)
    validate_config(config)
    assert config["max_workers"] == 2 and config["provider"]["type"] == "fake_multinode"
