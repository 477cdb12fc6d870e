"""k8s/rayjob.yaml and k8s/raycronjob.yaml are valid KubeRay resources that do what the README says.

The CRD schemas are KubeRay's own (../shared/kuberay/, beside the repository; see its README). They
leave ``additionalProperties`` open, so a misspelt key would pass them: the check here closes every
object that lists its properties, unless the schema marks it as preserving unknown fields.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
# SEQREC_SHARED: the shared/ folder where a checkout does not sit beside it (a git worktree).
KUBERAY = Path(os.environ.get("SEQREC_SHARED") or REPO.parent / "shared") / "kuberay"
MANIFESTS = {"RayJob": REPO / "k8s" / "rayjob.yaml", "RayCronJob": REPO / "k8s" / "raycronjob.yaml"}
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.skipif(
    not KUBERAY.is_dir(),
    reason=f"KubeRay CRD schemas not found at {KUBERAY} (CI checks the repository out beside shared/)",
)


def _closed(schema: Any) -> Any:
    """``schema`` with unknown keys refused wherever it lists the known ones."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def crd_schema(kind: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((KUBERAY / CRDS[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert found["served"], f"{kind} {version} is not served by this KubeRay"
    return _closed(found["schema"]["openAPIV3Schema"])


@functools.cache
def crd_validator(kind: str, version: str) -> Any:
    """The checked validator of ``kind``'s schema, built once per session: parsing a CRD's YAML and
    checking its schema took about 13 s per manifest."""
    schema = crd_schema(kind, version)
    # metadata is Kubernetes' ObjectMeta, which the CRD leaves to the API server.
    schema["properties"].pop("metadata", None)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(manifest: dict[str, Any]) -> None:
    group, _, version = manifest["apiVersion"].partition("/")
    assert group == "ray.io"
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    crd_validator(manifest["kind"], version).validate(body)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


def load(kind: str) -> dict[str, Any]:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def job_spec(kind: str) -> dict[str, Any]:
    manifest = load(kind)
    return manifest["spec"] if kind == "RayJob" else manifest["spec"]["jobTemplate"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_is_valid_against_the_kuberay_crd(kind):
    manifest = load(kind)
    assert manifest["kind"] == kind
    validate(manifest)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_cluster_lives_for_the_job_only(kind):
    spec = job_spec(kind)
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] <= 3600
    assert "clusterSelector" not in spec, "a standing cluster is what this replaces"
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert spec["entrypoint"].startswith("python -m seqrec nightly ")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_image_is_pinned_and_built_on_the_pinned_ray(kind):
    for container in _containers(job_spec(kind)):
        image = container["image"]
        assert ":" in image and not image.endswith(":latest"), image
        assert f"ray{ray.__version__}-py311" in image.rsplit(":", 1)[1], image
    base = re.search(r"^FROM (\S+)", (REPO / "k8s" / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_secrets_come_from_a_kubernetes_secret(kind):
    spec = job_spec(kind)
    for container in _containers(spec):
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not [k for k in runtime_env.get("env_vars", {}) if k.startswith("AWS_")], "job metadata is public"


def test_the_date_is_passed_in():
    one_night = yaml.safe_load(job_spec("RayJob")["runtimeEnvYAML"])["env_vars"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", one_night["SEQREC_DATE"])
    # The schedule runs for yesterday (the CLI's default when SEQREC_DATE is unset).
    assert "SEQREC_DATE" not in yaml.safe_load(job_spec("RayCronJob")["runtimeEnvYAML"]).get("env_vars", {})
    spec = load("RayCronJob")["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["timeZone"] == "Etc/UTC"
    assert spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600, "two nights must never overlap"


def _typo_top(m):
    m["spec"]["shutdownAfterJobFinish"] = m["spec"].pop("shutdownAfterJobFinishes")


def _typo_container(m):
    _containers(m["spec"])[0]["imag"] = _containers(m["spec"])[0].pop("image")


def _wrong_type(m):
    m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"


def _missing_group(m):
    del m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


def _bad_secret_ref(m):
    _containers(m["spec"])[0]["env"][2]["valueFrom"] = {"secretRef": {"name": "x"}}


BREAKAGES = [_typo_top, _typo_container, _wrong_type, _missing_group, _bad_secret_ref]


@pytest.mark.parametrize("break_it", BREAKAGES, ids=lambda f: f.__name__.lstrip("_"))
def test_a_broken_manifest_is_rejected(break_it):
    manifest = copy.deepcopy(load("RayJob"))
    break_it(manifest)
    with pytest.raises(jsonschema.ValidationError):
        validate(manifest)
