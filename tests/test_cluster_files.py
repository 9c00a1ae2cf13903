"""cluster/: the configs a user applies are well-formed and run this project."""
import re
import subprocess

import yaml

from conftest import REPO

C = REPO / "cluster"


def test_kuberay_manifests_run_fpn_on_gpu_workers():
    rc = yaml.safe_load((C / "raycluster.yaml").read_text())
    assert rc["kind"] == "RayCluster" and rc["spec"]["rayVersion"] == "2.60.0"
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    job = yaml.safe_load((C / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("fpn run ")


def test_aws_launcher_autoscales_gpu_workers():
    cfg = yaml.safe_load((C / "aws.yaml").read_text())
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert cfg["provider"]["type"] == "aws" and gpu["max_workers"] > gpu["min_workers"] == 0
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_dockerfile_installs_the_project_and_local_cluster_script_is_valid_bash():
    text = (C / "Dockerfile").read_text()
    assert "pip install ." in text and "COPY fpn_model" in text
    assert subprocess.run(["bash", "-n", str(C / "local-cluster.sh")]).returncode == 0
    usage = subprocess.run(["bash", str(C / "local-cluster.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "start" in usage.stdout and "stop" in usage.stdout


def _kuberay_clusters():
    """(file, RayClusterSpec) of each KubeRay manifest: the RayCluster's spec, the RayJob's rayClusterSpec."""
    rc = yaml.safe_load((C / "raycluster.yaml").read_text())["spec"]
    job = yaml.safe_load((C / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    return [("raycluster.yaml", rc), ("rayjob.yaml", job)]


def test_kuberay_clusters_have_token_auth_on():
    for name, spec in _kuberay_clusters():
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52), name  # the first Ray with token auth
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{name}: token auth is off"


def test_aws_launcher_starts_every_node_with_token_auth_and_a_local_dashboard():
    cfg = yaml.safe_load((C / "aws.yaml").read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for c in starts:  # each command runs in its own shell: the variable must be on the line itself
        assert re.match(r"RAY_AUTH_MODE=token (\S+=\S+ )*ray start", c), c
    head = next(c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    text = (C / "aws.yaml").read_text()
    assert "ray dashboard cluster/aws.yaml" in text  # how a user reaches the head's local dashboard


def test_no_cluster_config_binds_everywhere_without_token_auth():
    for path in C.glob("*.yaml"):
        text = path.read_text()
        if "0.0.0.0" in text:
            assert "authOptions" in text and "mode: token" in text, f"{path.name}: 0.0.0.0 without token auth"


def test_worker_nodes_keep_the_idle_workers_the_embedded_node_keeps():
    """Every config's GPU workers keep as many idle workers as jobs.runner.kept_workers gives for their CPUs (Ray
    ends workers idle for a second beyond one per CPU): aws.yaml computes it from the instance's CPUs in bash."""
    from jobs.runner import kept_workers

    for name, spec in _kuberay_clusters():
        worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in worker.get("env", [])}
        assert int(env["RAY_num_workers_soft_limit"]) == kept_workers(int(worker["resources"]["limits"]["cpu"])), name
    cfg = yaml.safe_load((C / "aws.yaml").read_text())
    start = next(c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    expr = re.search(r"RAY_num_workers_soft_limit=(\S+)", start).group(1)
    for cpus in (8, 32):
        out = subprocess.run(["bash", "-c", f"nproc() {{ echo {cpus}; }}; echo {expr}"], capture_output=True, text=True)
        assert int(out.stdout) == kept_workers(cpus), (expr, out.stderr)
