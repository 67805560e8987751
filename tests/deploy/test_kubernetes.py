"""deploy/kubernetes: every overlay rendered by kustomize and every manifest validated (Kubernetes
schemas, KubeRay v1.7.0 CRDs), what the manifests refer to exists or is documented, the cluster
keeps the deployment's rules (head schedules no training, workers scale from zero, token auth, shared
object storage, probes, requests/limits, /dev/shm), and a broken manifest is caught."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_checks import (
    DEPLOY,
    KUBE,
    KUBERAY,
    OVERLAYS,
    SCHEMAS,
    kustomize,
    load,
    mutated,
    named,
    pod_specs,
    problems,
    referenced,
    schemas_dir,
)

README_SECTION = DEPLOY.parent / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def schemas() -> Path:
    return schemas_dir()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(KUBE / "overlays" / name) for name in OVERLAYS} | {
        "base": kustomize(KUBE / "base")
    }


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_every_rendered_manifest_validates(name: str, rendered: dict[str, Any], schemas: Path) -> None:
    docs = rendered[name]
    assert problems(docs, schemas) == []
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "StatefulSet",
        "Service",
    } <= kinds
    assert {"Job", "RayCluster", "NetworkPolicy"} <= kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"harmonicdet"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_rayjob_example_renders_with_each_overlays_image(
    name: str, rendered: dict[str, Any], schemas: Path
) -> None:
    (job,) = kustomize(KUBE / "overlays" / name / "rayjob")
    assert problems([job], schemas) == []
    (cluster,) = named(rendered[name], "RayCluster").values()
    images = {c["image"] for _, pod in pod_specs(cluster) for c in pod["containers"]}
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert images == {submitter["image"]}, "the submitter must pull the image the cluster runs"
    assert job["spec"]["entrypoint"].startswith("python -m workers.run /app/configs/")
    spec_path = job["spec"]["entrypoint"].split()[-1].replace("/app/", "")
    assert (DEPLOY.parent / spec_path).is_file(), (
        f"the RayJob runs {spec_path}, which the image does not hold"
    )
    env = {e["name"]: e for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "harmonicdet-ray-token",
        "key": "auth_token",
    }


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_ray_cluster_keeps_the_deployment_rules(name: str, rendered: dict[str, Any]) -> None:
    docs = rendered[name]
    (cluster,) = named(docs, "RayCluster").values()
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head trains nothing
    assert spec["authOptions"] == {"mode": "token", "secretName": "harmonicdet-ray-token"}
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert groups and all(
        g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1 for g in groups
    )
    for where, pod in pod_specs(cluster):
        (container,) = pod["containers"]
        res = container["resources"]
        assert res["requests"] and res["limits"], where
        assert "readinessProbe" in container, where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert "persistentVolumeClaim" in volumes[mounts["/data"]], where
        assert {"configMapRef": {"name": "harmonicdet-config"}} in container["envFrom"], where
        assert pod["securityContext"]["runAsNonRoot"] is True, where


def test_the_gpu_overlay_has_one_autoscaling_group_per_accelerator(rendered: dict[str, Any]) -> None:
    (cluster,) = named(rendered["gpu"], "RayCluster").values()
    types = []
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert group["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"]
        (accel,) = re.findall(r"accelerator_type:([A-Za-z0-9]+)", group["rayStartParams"]["resources"])
        types.append(accel)
    assert len(types) >= 2 and len(set(types)) == len(types)


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_declared_node_types_are_the_worker_groups(name: str, rendered: dict[str, Any]) -> None:
    """HDET_CLUSTER_NODE_TYPES (what the API admits against and `use_gpu: auto` reads) holds one
    node type per worker group: its CPUs, GPUs and accelerator marker, and no more memory than Ray
    leaves beside its object store (70% of the pod's)."""
    import json

    from workers.resources import parse_node_types

    docs = rendered[name]
    data = named(docs, "ConfigMap")["harmonicdet-config"]["data"]
    declared = parse_node_types(data["HDET_CLUSTER_NODE_TYPES"])
    (cluster,) = named(docs, "RayCluster").values()
    groups = cluster["spec"]["workerGroupSpecs"]
    assert len(declared) == len(groups)
    for node, group in zip(declared, groups, strict=True):
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        want = {"CPU": float(limits["cpu"])}
        if "num-gpus" in params:
            want["GPU"] = float(params["num-gpus"])
        if "resources" in params:  # a JSON object inside a quoted string, as `ray start` takes it
            want |= {k: float(v) for k, v in json.loads(json.loads(params["resources"])).items()}
        assert {k: v for k, v in node.items() if k != "memory"} == want, group["groupName"]
        pod_memory = float(limits["memory"].removesuffix("Gi")) * 2**30
        assert 0.4 * pod_memory <= node["memory"] <= 0.7 * pod_memory, group["groupName"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_api_is_deployed_with_probes_its_token_and_postgres(name: str, rendered: dict[str, Any]) -> None:
    docs = rendered[name]
    api = named(docs, "Deployment")["harmonicdet-api"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["HDET_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "harmonicdet-api", "key": "token"}
    assert env["HDET_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "harmonicdet-api-db"
    (cluster,) = named(docs, "RayCluster")
    assert f"--ray-address=http://{cluster}-head-svc:8265" in container["args"]  # KubeRay's head Service
    assert "--mlflow-uri=http://mlflow:5000" in container["args"]
    assert "HDET_DATA_ROOTS" in named(docs, "ConfigMap")["harmonicdet-config"]["data"]
    init = named(docs, "ConfigMap")["postgres-init"]["data"]
    assert any("CREATE DATABASE harmonicdet" in script for script in init.values())
    svc = named(docs, "Service")["harmonicdet-api"]
    assert svc["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()


def _pod_labels(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """``(where, labels)`` of every pod template of a manifest."""
    spec = doc.get("spec") or {}
    templates = []
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        templates = [(doc["metadata"]["name"], spec["template"])]
    elif doc["kind"] == "RayCluster":
        templates = [("ray head", spec["headGroupSpec"]["template"])]
        templates += [(f"ray {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    for where, template in templates:
        yield where, (template.get("metadata") or {}).get("labels") or {}


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_api_and_ray_reach_mlflow_postgres_and_minio(name: str, rendered: dict[str, Any]) -> None:
    docs = rendered[name]
    pods = dict(p for d in docs for p in _pod_labels(d))
    policies = list(named(docs, "NetworkPolicy").values())

    def reach(target: str) -> set[str]:
        """The pods a NetworkPolicy lets in to the pods of ``target`` (every pod, without one)."""
        labels = pods[target]
        mine = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        if not mine:
            return set(pods)
        froms = [
            f["podSelector"]["matchLabels"]
            for p in mine
            for rule in p["spec"]["ingress"]
            for f in rule["from"]
        ]
        return {w for w, lab in pods.items() if any(sel.items() <= lab.items() for sel in froms)}

    rays = {w for w in pods if w.startswith("ray ")}
    assert reach("mlflow") == {"harmonicdet-api", *rays}
    assert reach("postgres") == {"harmonicdet-api", "mlflow"}
    assert reach("minio") == {"mlflow", "minio-make-bucket", *rays}


def test_the_dev_overlay_asks_for_no_gpu(rendered: dict[str, Any]) -> None:
    for doc in rendered["dev"]:
        for where, pod in pod_specs(doc):
            for c in pod["containers"]:
                assert "nvidia.com/gpu" not in (c.get("resources", {}).get("limits") or {}), where


@pytest.mark.parametrize("name", OVERLAYS)
def test_ray_and_mlflow_store_on_the_same_object_store(name: str, rendered: dict[str, Any]) -> None:
    docs = rendered[name]
    config = named(docs, "ConfigMap")["harmonicdet-config"]["data"]
    storage = config["HDET_STORAGE_PATH"]
    assert storage.startswith("s3://"), "Ray's storage_path must be storage every node sees"
    bucket = storage.removeprefix("s3://").split("/")[0]
    args = named(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    (dest,) = [a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination=")]
    assert dest.startswith(f"s3://{bucket}/")
    assert config["HDET_BUCKET"] == bucket
    assert config["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "mlflow" in named(docs, "Service")


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_reference_resolves_or_is_documented(name: str, rendered: dict[str, Any]) -> None:
    docs = rendered[name]
    refs = referenced(docs)
    assert refs["configmap"] <= set(named(docs, "ConfigMap"))
    claims = set(named(docs, "PersistentVolumeClaim"))
    assert refs["pvc"] <= claims
    # Every Service selects the pods of some workload.
    templates = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    for svc_name, svc in named(docs, "Service").items():
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in templates), (
            f"Service {svc_name} selects nothing"
        )
    # Secrets are created by hand (never committed): the README section shows each, with its keys.
    readme = README_SECTION.read_text()
    keyed: dict[str, set[str]] = {}
    for ref in refs["secret"]:
        secret, _, key = ref.partition("/")
        keyed.setdefault(secret, set()).update({key} if key else set())
    assert keyed, "no Secret referenced"
    for secret, keys in keyed.items():
        m = re.search(
            rf"kubectl -n harmonicdet create secret generic {secret}\b(.*?)(?:\n\n|```)", readme, re.S
        )
        assert m, f"the README section does not show how to create the Secret {secret}"
        for key in keys:
            assert f"--from-literal={key}=" in m.group(1), f"Secret {secret}: key {key} not documented"


@pytest.mark.parametrize(
    "file, old, new, words",
    [
        # a typo in a RayCluster field (KubeRay CRD, strict)
        (
            "base/raycluster.yaml",
            "    rayStartParams:\n      num-cpus",
            "    rayStartParam:\n      num-cpus",
            "rayStartParam",
        ),
        # a wrong type in a RayCluster field
        ("base/raycluster.yaml", "minReplicas: 0", 'minReplicas: "none"', "minReplicas"),
        # a wrong type in a Deployment (Kubernetes schema)
        (
            "base/mlflow.yaml",
            "{name: http, containerPort: 5000}",
            "{name: http, containerPort: five}",
            "containerPort",
        ),
        # an unknown field in a StatefulSet (Kubernetes schema, strict)
        ("base/postgres.yaml", "          readinessProbe:", "          readinesProbe:", "readinesProbe"),
    ],
)
def test_a_broken_manifest_fails_validation(
    tmp_path: Path, schemas: Path, file: str, old: str, new: str, words: str
) -> None:
    copy = mutated(KUBE, tmp_path / "kubernetes", file, old, new)
    found = [p for name in OVERLAYS for p in problems(kustomize(copy / "overlays" / name), schemas)]
    assert found, f"breaking {file} went unnoticed"
    assert any(words in p for p in found), found


def test_a_broken_rayjob_fails_validation(tmp_path: Path, schemas: Path) -> None:
    copy = mutated(
        KUBE,
        tmp_path / "kubernetes",
        "rayjob/rayjob.yaml",
        "  backoffLimit: 0",
        "  backoffLimit: none\n  retries: 1",
    )
    found = problems(load(copy / "rayjob" / "rayjob.yaml"), schemas)
    assert any("backoffLimit" in p for p in found), found
    assert any("retries" in p for p in found), found


def test_the_schemas_are_in_the_repository_with_their_licence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HDET_SCHEMAS_DIR", raising=False)
    assert schemas_dir() == SCHEMAS
    assert "Apache License" in (SCHEMAS / KUBERAY / "LICENSE").read_text()


def test_a_schemas_folder_without_the_crds_fails_saying_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HDET_SCHEMAS_DIR", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="no kuberay-v1.7.0/ray.io_rayclusters.yaml"):
        schemas_dir()


PINNED = re.compile(r"@sha256:[0-9a-f]{64}$|:(\d+\.\d+(\.\d+)?([-.][\w.]+)?|RELEASE\.[\w.-]+)$")


def test_every_image_is_pinned_by_digest_or_a_full_version_tag(rendered: dict[str, Any]) -> None:
    docs = [d for docs in rendered.values() for d in docs]
    docs += [d for name in OVERLAYS for d in kustomize(KUBE / "overlays" / name / "rayjob")]
    images = {c["image"] for d in docs for _, pod in pod_specs(d) for c in pod["containers"]}
    images |= {s["image"] for s in load(DEPLOY / "compose.yaml")[0]["services"].values()}
    assert {"postgres:16.6-alpine3.20", "harmonicdet:0.1.0"} <= images
    assert [i for i in images if not PINNED.search(i)] == []
    assert not PINNED.search("postgres:16-alpine") and not PINNED.search("minio/minio:latest")
