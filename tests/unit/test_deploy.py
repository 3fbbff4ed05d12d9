"""deploy/: the Kubernetes manifests validated against the Kubernetes schemas
(``kubernetes-validate``, strict: an unknown field fails), the overlays rendered
with ``kubectl kustomize`` where kubectl is installed, and the ConfigMaps'
``sieve.toml`` loaded by sieve's own config loader. No API server is involved."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import load_config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.37.0"
PATCHES = {K8S / "overlays" / "gpu" / "candidate-gpu.yaml"}  # partial, merged by kustomize


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _manifests() -> list[Path]:
    return sorted(
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p not in PATCHES
    )


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays were not rendered here")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return _docs(out.stdout)


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_base_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = _docs(path.read_text())
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field() -> None:
    # strict validation is live: a misspelled field in a real manifest fails
    doc = _docs((K8S / "base" / "ranker.yaml").read_text())[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "sharded"])
def test_overlays_render_to_valid_manifests_that_fit_the_services(overlay: str) -> None:
    docs = _render(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    by = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap"
           else d["metadata"]["name"]): d for d in docs}  # fmt: skip
    assert {k for k, _ in by} >= {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ConfigMap", "PersistentVolumeClaim",
    }  # fmt: skip
    config = load_config_text(by["ConfigMap", "sieve-config"]["data"]["sieve.toml"])
    shards = config.ranker.candidate_shards
    candidates = (
        [f"sieve-candidate-shard-{i}" for i in range(len(shards))]
        if overlay == "sharded"
        else ["sieve-candidate"]
    )
    for name, port in (
        *((c, config.candidate.port) for c in candidates),
        ("sieve-ranker", config.ranker.port),
    ):
        assert by["Service", name]["spec"]["clusterIP"] == "None"  # headless: per-call balancing
        assert ("PodDisruptionBudget", name) in by
        pod = by["Deployment", name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        assert container["startupProbe"]["periodSeconds"] * container["startupProbe"][
            "failureThreshold"] >= 600  # fmt: skip
        assert "--config" in container["args"] and "/etc/sieve/sieve.toml" in container["args"]
    hpa = by["HorizontalPodAutoscaler", "sieve-ranker"]["spec"]
    assert {m["type"] for m in hpa["metrics"]} == {"Resource", "Pods"}
    assert config.ranker.rerank.history.store == "redis"  # shared by every ranker pod
    if overlay == "sharded":
        # shard i's address is shard i's Service, whose pods serve --shard i
        assert len(shards) == 2 and ("Deployment", "sieve-candidate") not in by
        for i, address in enumerate(shards):
            assert address == f"dns:///sieve-candidate-shard-{i}:{config.candidate.port}"
            args = by["Deployment", f"sieve-candidate-shard-{i}"]["spec"]["template"]["spec"][
                "containers"][0]["args"]  # fmt: skip
            assert args[args.index("--shard") + 1] == str(i)
        return
    assert not shards and config.ranker.candidate_address.startswith("dns:///")
    candidate = by["Deployment", "sieve-candidate"]["spec"]["template"]["spec"]["containers"][0]
    gpus = candidate["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and config.candidate.device == "gpu"
    else:
        assert gpus is None and config.candidate.device == "auto"


def load_config_text(text: str) -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_config(Path(f.name))
    finally:
        Path(f.name).unlink()
