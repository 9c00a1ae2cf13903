"""cluster/: the configs a user applies are well-formed and run this project."""
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
