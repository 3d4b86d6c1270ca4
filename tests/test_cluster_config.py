"""How satseg meets Ray: ray_cluster.yaml is a valid cluster-launcher config (Ray's own schema validation),
and `connect()`'s local instance listens on loopback only, whatever imported ray first."""

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
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


# Run in a fresh interpreter: ray first, satseg after, and no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER in the environment.
_LOCAL_INSTANCE = """
import json, os
import ray
from pipeline.cluster import connect
from tests.test_cluster_config import listening_addresses
first, again = connect(None, num_cpus=1), connect(None)
ray.get(ray.remote(lambda: 0).remote())  # a worker is up too
print(json.dumps({
    "on_cluster": [first, again],
    "node_ips": [n["NodeManagerAddress"] for n in ray.nodes()],
    "gcs": ray.get_runtime_context().gcs_address,
    "listening": listening_addresses(os.getpid()),
}))
ray.shutdown()
"""


def listening_addresses(root_pid: int) -> list[str]:
    """The addresses of every listening TCP socket held by ``root_pid`` or its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root_pid}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    inodes = set()
    for pid in tree:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-endian
            found.append(str(ipaddress.ip_address(raw)))
    return sorted(found)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads listening sockets from /proc")
def test_a_local_instance_listens_on_loopback_only_even_when_ray_was_imported_first():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    ray_tmp = tempfile.mkdtemp(prefix="satseg-lb-")  # short: Ray's socket paths must stay under ~107 characters
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LOCAL_INSTANCE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ran["on_cluster"] == [False, False]
    assert ran["node_ips"] == ["127.0.0.1"] and ran["gcs"].startswith("127.0.0.1:")
    assert len(ran["listening"]) >= 3  # GCS, raylet, agents, workers: the check is not vacuous
    assert all(_is_loopback(a) for a in ran["listening"]), ran["listening"]
