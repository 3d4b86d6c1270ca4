"""ray_cluster.yaml is a valid Ray cluster-launcher config, checked by Ray's own schema validation."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_ray_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert any("pip install" in c and "satseg" in c for c in config["setup_commands"])
