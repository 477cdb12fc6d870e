"""cluster.yaml passes the checks `ray up` makes before it contacts AWS, and typos do not.

`ray up` runs ray.autoscaler._private.commands._bootstrap_config: prepare_config (merge with the
provider defaults, docker checks, per-type worker bounds), then the provider's resource
autodetection and bootstrap (AWS API calls: skipped here) around validate_config (the JSON schema
ray/autoscaler/ray-schema.json plus cross-field checks). The schema lets provider keys and EC2
node_config through unchecked, so those are checked here against the schema's provider keys and
botocore's EC2 RunInstances model (local data, no network).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
HEAD = "head.cpu"
GPU = "worker.gpu"


def load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` validates locally, plus the keys the Ray schema leaves unchecked."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    _check_provider_keys(prepared["provider"])
    for name, node_type in prepared["available_node_types"].items():
        _check_node_config(name, node_type["node_config"])
    return prepared


def _ray_schema() -> dict[str, Any]:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _check_provider_keys(provider: dict[str, Any]) -> None:
    known = set(_ray_schema()["properties"]["provider"]["properties"])
    unknown = set(provider) - known - {"_config_cache_path"}
    if unknown:
        raise ValueError(f"unknown provider keys {sorted(unknown)}; known: {sorted(known)}")


def _check_node_config(name: str, node_config: dict[str, Any]) -> None:
    """node_config goes verbatim to EC2 RunInstances: validate it against botocore's model."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
    if report.has_errors():
        raise ValueError(f"node type {name!r}: invalid EC2 node_config:\n{report.generate_report()}")


# -- the real file -----------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_up_validation():
    prepared = ray_up_checks(load())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["head_node_type"] == HEAD
    assert prepared["idle_timeout_minutes"] > 0


def test_node_types():
    config = load()
    types = config["available_node_types"]
    assert set(types) == {HEAD, GPU}

    head = types[HEAD]
    # Issue 18: the head schedules no Ray work (was `>= 1` when prepare/evaluate ran as head tasks).
    assert head["resources"].get("CPU", 0) == 0
    assert head["resources"].get("GPU", 0) == 0
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])

    gpu = types[GPU]
    assert gpu["min_workers"] == 0, "GPU workers must scale to zero between nightly runs"
    assert gpu["max_workers"] >= 1
    assert gpu["max_workers"] <= config["max_workers"]
    assert gpu["resources"]["GPU"] >= 1
    assert re.match(r"^(g5|g6|g6e|p4d|p5)\.", gpu["node_config"]["InstanceType"])


def _images(config: dict[str, Any]) -> list[str]:
    docker = config["docker"]
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    for node_type in config["available_node_types"].values():
        images.append(node_type.get("docker", {}).get("worker_image"))
    return [i for i in images if i]


def test_docker_image_is_current_ray_gpu_image():
    images = _images(load())
    assert images
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray", f"{image}: use rayproject/ray (ray-ml images are deprecated)"
        assert "ray-ml" not in image
        assert tag.split("-")[0] == ray.__version__, (
            f"{image}: tag must match the installed Ray {ray.__version__}"
        )
    gpu_image = load()["docker"].get("worker_image") or load()["docker"]["image"]
    assert re.search(r"-(gpu|cu\d+)$", gpu_image), f"{gpu_image}: GPU workers need a CUDA image"


def test_setup_installs_seqrec_from_the_mounted_checkout():
    config = load()
    mounts = config["file_mounts"]
    assert mounts.get("~/seqrec") == "."
    assert (REPO / mounts["~/seqrec"] / "pyproject.toml").is_file()
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/seqrec" in setup
    assert "-c ~/seqrec/constraints.txt" in setup and "constraints-test" not in setup
    assert "_build_version.txt" in setup, "the synced checkout has no .git: the code version must be stamped"
    # A CPU-only torch would silently make the GPU workers train on CPU.
    assert "+cpu" not in setup and "whl/cpu" not in setup
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in starts)
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


# -- typos must fail ---------------------------------------------------------------------------


def _rename(d: dict[str, Any], old: str, new: str) -> None:
    d[new] = d.pop(old)


def _typo_max_worker(c):
    _rename(c["available_node_types"][GPU], "max_workers", "max_worker")


def _typo_min_worker(c):
    _rename(c["available_node_types"][GPU], "min_workers", "min_worker")


def _typo_top_level(c):
    _rename(c, "idle_timeout_minutes", "idle_timeout_minute")


def _typo_docker_key(c):
    _rename(c["docker"], "image", "imag")


def _typo_auth_key(c):
    _rename(c["auth"], "ssh_user", "ssh_usr")


def _typo_provider_key(c):
    _rename(c["provider"], "availability_zone", "availability_zones")


def _typo_node_config_key(c):
    _rename(c["available_node_types"][GPU]["node_config"], "InstanceType", "InstanceTyp")


def _missing_resources(c):
    del c["available_node_types"][GPU]["resources"]


def _wrong_head_type(c):
    c["head_node_type"] = "head"


def _string_max_workers(c):
    c["available_node_types"][GPU]["max_workers"] = "4"


def _fractional_gpu(c):
    c["available_node_types"][GPU]["resources"]["GPU"] = 0.5


def _string_gpu(c):
    c["available_node_types"][GPU]["resources"]["GPU"] = "1"


def _commands_not_a_list(c):
    c["setup_commands"] = "pip install -e ~/seqrec"


def _string_volume_size(c):
    c["available_node_types"][GPU]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = "200GB"


def _min_workers_over_global(c):
    c["available_node_types"][GPU]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "break_it",
    [
        _typo_max_worker,
        _typo_min_worker,
        _typo_top_level,
        _typo_docker_key,
        _typo_auth_key,
        _typo_provider_key,
        _typo_node_config_key,
        _missing_resources,
        _wrong_head_type,
        _string_max_workers,
        _fractional_gpu,
        _string_gpu,
        _commands_not_a_list,
        _string_volume_size,
        _min_workers_over_global,
    ],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_broken_config_is_rejected(break_it):
    import jsonschema

    config = load()
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, TypeError, AssertionError)):
        ray_up_checks(config)


# --------------------------------------------------------------------------------------------
# configs/prod.yaml: the config the README's cluster commands pass
# --------------------------------------------------------------------------------------------
def test_readme_commands_name_configs_that_exist_and_load():
    from seqrec.config import load_config

    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"--config (configs/[\w.-]+\.yaml)", readme))
    assert "configs/prod.yaml" in named
    for path in named:
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"
        load_config(REPO / path)  # unknown keys and bad choices raise


def test_prod_config_fits_the_cluster_node_types():
    from seqrec.config import load_config

    prod = load_config(REPO / "configs" / "prod.yaml")
    gpu = load()["available_node_types"][GPU]
    node_cpus, node_gpus, nodes = gpu["resources"]["CPU"], gpu["resources"]["GPU"], gpu["max_workers"]
    assert prod.train.use_gpu and prod.score.gpus_per_actor > 0  # the cluster's workers are GPU nodes
    # Every training worker and every scoring actor gets a place on the GPU nodes, with a CPU to spare
    # for Ray Data's input tasks on each node.
    assert prod.train.num_workers <= nodes * node_gpus
    assert prod.train.cpus_per_worker <= node_cpus - 1
    assert prod.score.num_actors * prod.score.gpus_per_actor <= nodes * node_gpus
    assert prod.score.cpus_per_actor <= node_cpus - 1
    assert prod.train.batch_size % prod.train.num_workers == 0
