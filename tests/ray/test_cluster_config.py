"""The deployment files: cluster.yaml validates against Ray's own cluster-config schema, and the Serve
config files validate against Serve's schema with `args` that AppConfig (extra="forbid") accepts.
"""
from __future__ import annotations

import os

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app.config import AppConfig, resolve_workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY_SCHEMA = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")


def _load(path: str) -> dict:
    with open(os.path.join(REPO, path)) as handle:
        return yaml.safe_load(handle)


def test_cluster_yaml_matches_rays_schema():
    import json

    with open(RAY_SCHEMA) as handle:
        schema = json.load(handle)
    cluster = _load("cluster.yaml")
    jsonschema.validate(cluster, schema)
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["max_workers"] > gpu["min_workers"]
    commands = " ".join(cluster["head_start_ray_commands"])
    assert "serve deploy configs/gpu_cluster.yaml" in commands and "LORA_SAVE_PATH=s3://" in commands
    with pytest.raises(jsonschema.ValidationError):  # the schema really checks: a typo is refused
        jsonschema.validate({**cluster, "max_worker": 3}, schema)


@pytest.mark.parametrize("path, env_store, expected", [
    ("configs/local_cpu.yaml", None, (1, False)),
    ("configs/gpu_cluster.yaml", "s3://bucket/adapters", (4, True)),
])
def test_serve_configs_are_valid(path, env_store, expected, monkeypatch):
    if env_store:
        monkeypatch.setenv("LORA_SAVE_PATH", env_store)  # cluster.yaml exports it on every node
    config = ServeDeploySchema.parse_obj(_load(path))
    (application,) = config.applications
    assert application.import_path == "serve.app.builder:build_app"
    app_config = AppConfig(**application.args)
    # An autoscaling cluster reports no GPUs before scale-up: the worker count must not depend on it.
    assert resolve_workers(app_config, cluster_gpus=0) == expected
    if env_store:
        assert app_config.store_url == env_store
