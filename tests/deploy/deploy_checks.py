"""Offline validation of deploy/: Kubernetes manifests rendered by kustomize (`kubectl kustomize`),
checked against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields are errors)
and, for RayCluster/RayJob, against the KubeRay v1.7.0 CRDs' openAPIV3Schema (made strict the same
way: an object schema that lists its properties rejects others, as `kubectl apply
--validate=strict` does); the compose file against the Compose specification (compose-spec).

The CRDs are kept in ``deploy/schemas/kuberay-v1.7.0/`` (Apache-2.0, with their licence);
``HDET_SCHEMAS_DIR`` may name another folder that holds ``kuberay-v1.7.0/``.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "gpu")
#: The oldest Kubernetes minor the manifests are checked against (kubernetes-validate's schemas).
K8S_VERSION = "1.30.0"
SCHEMAS_ENV = "HDET_SCHEMAS_DIR"
SCHEMAS = DEPLOY / "schemas"
KUBERAY = "kuberay-v1.7.0"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def schemas_dir() -> Path:
    """The folder holding ``kuberay-v1.7.0/``: ``$HDET_SCHEMAS_DIR``, else ``deploy/schemas``; fails the
    test (not a skip) when the CRDs are not there."""
    value = os.environ.get(SCHEMAS_ENV) or str(SCHEMAS)
    missing = [f for f in CRD_FILES if not (Path(value) / KUBERAY / f).is_file()]
    if missing:
        pytest.fail(f"{SCHEMAS_ENV}={value}: no {', '.join(f'{KUBERAY}/{m}' for m in missing)} there")
    return Path(value)


def _strict(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties and
    neither allows others nor preserves unknown fields."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=4)
def crd_validators(folder: str) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """``(apiVersion, kind) -> validator`` for every served version of the KubeRay CRDs."""
    out: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    for name in CRD_FILES:
        crd = yaml.load((Path(folder) / KUBERAY / name).read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            out[(f"{group}/{version['name']}", kind)] = cls(schema)
    return out


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl kustomize PATH`` renders (kubectl's built-in kustomize)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: it renders the kustomize overlays (`kubectl kustomize`)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ValueError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [d for d in yaml.load_all(out.stdout, Loader=_Loader) if d]


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def _where(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name') or meta.get('generateName')}"


def problems(docs: Iterable[dict[str, Any]], schemas: Path) -> list[str]:
    """Every schema violation of ``docs``, as ``Kind/name: field.path: message``."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    crds = crd_validators(str(schemas))
    found: list[str] = []
    for doc in docs:
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        if key[0].startswith("ray.io/"):
            validator = crds.get(key)
            if validator is None:
                found.append(f"{_where(doc)}: no KubeRay schema for {key[0]} {key[1]}")
                continue
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in err.absolute_path)
                found.append(f"{_where(doc)}: {path}: {err.message}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            found.append(f"{_where(doc)}: {path}: {err.message}")
        except SchemaNotFoundError as err:
            found.append(f"{_where(doc)}: {err.message}")
    return found


# -- what the manifests refer to -------------------------------------------------------------------


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, pod spec)`` of every pod template a manifest holds (Deployments, Jobs, RayCluster
    head and worker groups, a RayJob's submitter and cluster)."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield _where(doc), spec["template"]["spec"]
    elif kind == "RayCluster":
        yield from _ray_cluster_pods(_where(doc), spec)
    elif kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield f"{_where(doc)} submitter", spec["submitterPodTemplate"]["spec"]
        if "rayClusterSpec" in spec:
            yield from _ray_cluster_pods(_where(doc), spec["rayClusterSpec"])


def _ray_cluster_pods(where: str, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs") or []:
        yield f"{where} group {group['groupName']}", group["template"]["spec"]


def referenced(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Names referred to: ``configmap``, ``secret`` (``name/key`` for keyed references),
    ``pvc``; the RayCluster's token Secret is ``name/auth_token``."""
    refs: dict[str, set[str]] = {"configmap": set(), "secret": set(), "pvc": set()}
    for doc in docs:
        auth = (doc.get("spec") or {}).get("authOptions") or {}
        if auth.get("secretName"):
            refs["secret"].add(f"{auth['secretName']}/auth_token")
        for _, pod in pod_specs(doc):
            for c in [*pod.get("containers", []), *pod.get("initContainers", [])]:
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        refs["configmap"].add(src["configMapRef"]["name"])
                    if "secretRef" in src:
                        refs["secret"].add(src["secretRef"]["name"])
                for var in c.get("env", []):
                    ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        refs["secret"].add(f"{ref['name']}/{ref['key']}")
                    ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref:
                        refs["configmap"].add(ref["name"])
            for vol in pod.get("volumes", []):
                if "persistentVolumeClaim" in vol:
                    refs["pvc"].add(vol["persistentVolumeClaim"]["claimName"])
    return refs


def named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def mutated(src: Path, dst: Path, file: str, old: str, new: str) -> Path:
    """A copy of the folder ``src`` at ``dst`` whose ``file`` has ``old`` replaced by ``new`` once."""
    shutil.copytree(src, dst)
    target = dst / file
    text = target.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {file}"
    target.write_text(text.replace(old, new, 1))
    return dst


def deepcopy(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return copy.deepcopy(docs)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """Stop a server this test started with ``start_new_session=True``: SIGTERM to its process group
    (the process and everything it started, nothing else), SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # the leader is gone; let the rest of its group exit
