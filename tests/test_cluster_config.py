"""ray_cluster.yaml is a valid Ray cluster-launcher config, checked by Ray's own schema validation."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_ray_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > gpu["min_workers"] >= 1  # autoscaling GPU workers
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] >= 1  # a CPU head that also takes read tasks


def test_every_node_starts_ray_from_the_python_that_has_satseg():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    installs = [c for c in config["setup_commands"] if "pip install" in c and "satseg" in c]
    assert installs and all(c.startswith("~/satseg-venv/bin/python -m pip") for c in installs)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "~/satseg-venv/bin/ray start" in start
        assert "SATSEG_PYTHON=$HOME/satseg-venv/bin/python" in start  # what a submitted job's entrypoint runs
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start  # the Jobs API is reached through `ray dashboard`
