"""``ray_cluster.yaml`` is a cluster config that ``ray up`` accepts: Ray's own defaults merge, schema
validation, and the promises its comments make (Ray version, localhost dashboard, CPU-free head)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(config: dict) -> dict:
    # What `ray up` does before it touches a cloud: fill Ray's defaults, then check against its schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_accepts_the_cluster_config(cluster_config):
    prepared = _validated(cluster_config)
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    assert prepared["head_node_type"] == "head"


def test_the_schema_check_catches_a_misspelt_key(cluster_config):
    from jsonschema import ValidationError

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # min_workers misspelt
    with pytest.raises(ValidationError, match="min_worker"):
        _validated(broken)


def test_cluster_runs_our_ray_and_keeps_the_dashboard_local(cluster_config):
    import ray

    images = [cluster_config["docker"][key] for key in ("image", "head_image", "worker_image")]
    images += [t["docker"]["worker_image"] for t in cluster_config["available_node_types"].values()
               if "docker" in t and "worker_image" in t["docker"]]
    assert all(f"ray:{ray.__version__}-" in image for image in images), images
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start or "--dashboard-host 127.0.0.1" in head_start
    assert cluster_config["available_node_types"]["head"]["resources"] == {"CPU": 0}
