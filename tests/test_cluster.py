"""Jobs on a real two-node Ray cluster (head with dashboard + one worker raylet on 127.0.0.1):
submit, status, list, logs, cancel, resume, with every frame written exactly once and detector
actors on both nodes."""
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml
from click.testing import CliRunner

from conftest import GOP, REPO, SOAP, _free_port
from faulttable import record
from jobs.cli import cli

pytestmark = pytest.mark.slow
SCRIPT = REPO / "cluster" / "local-cluster.sh"


@pytest.fixture(scope="module")
def cluster_dir(request):
    """The cluster's --dir: its temp dir, logs and unpacked job working dirs (~7 MB); removed after the module
    unless one of its tests failed (then kept for its logs)."""
    d = Path(f"/tmp/fpnt-{uuid.uuid4().hex[:6]}")
    failed = request.session.testsfailed
    yield d
    if request.session.testsfailed == failed:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def gcs_port():
    """The head's GCS port (what `ray start --address` and a driver's `ray.init` join)."""
    return _free_port()


@pytest.fixture(scope="module")
def cluster(cluster_dir, gcs_port):
    """A head and one worker with token auth on, their token in a file of this cluster's own
    (RAY_AUTH_TOKEN_PATH for the nodes, the jobs they run and this test's clients). Both nodes run on this
    2-core machine, so each offers 1 CPU: with 2 each, their detectors ran 4 torch threads on 2 cores and a
    65-frame job took 83.5 s instead of 47.6."""
    port, dash = gcs_port, _free_port()
    d = str(cluster_dir)
    cluster_dir.mkdir(parents=True)
    token = cluster_dir / "auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**os.environ, **auth, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    args = ["--dir", d, "--port", str(port), "--dashboard-port", str(dash)]
    old = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    try:
        subprocess.run([str(SCRIPT), "start", "--workers", "1", "--head-cpus", "1", "--worker-cpus", "1", *args],
                       check=True, env=env, timeout=180)
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(SCRIPT), "stop", *args], env=env, timeout=60)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fpn(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def submitted_id(text):
    """The job id `fpn submit` or `fpn resume` printed ("submitted ID ...", "resubmitted OLD as ID: ..."; Ray's job
    client may log lines of its own before it: to the test's stderr when this module's tests run first, since
    Ray's log handler binds the stream current when it is made)."""
    found = re.search(r"^(?:submitted|resubmitted \S+ as) ([^\s:]+)", text, re.M)
    assert found, text
    return found.group(1)


def wait_for(address, job_id, states, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        code, out = fpn("status", job_id, "--address", address, "--format", "json")
        row = json.loads(out) if out.strip().startswith("{") else {}
        if row.get("status") in states:
            return row
        time.sleep(2)
    raise TimeoutError(f"{job_id} did not reach {states}; last: {out}")


def frames(out):
    return pads.dataset(str(Path(out) / "frames"), format="parquet").to_table()


def detector_nodes(address):
    """Nodes that ran detector actors, from Ray's state API (a fresh process, as a user runs it)."""
    ray = str(Path(os.sys.executable).parent / "ray")
    out = subprocess.run([ray, "list", "actors", "--address", address, "--detail", "--format", "json", "--limit", "1000"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
    actors = json.loads(out.stdout)
    return {a["node_id"] for a in actors if "Detector" in (a.get("class_name") or "")}


def spec_file(tmp_path, inputs, out, **extra):
    spec = {"inputs": [str(i) for i in inputs], "output": str(out), "batch_size": 4, "segment_frames": 16,
            "resources": {"num_detectors": 2, "cpus_per_detector": 0.75, "decode_cpus": 0.25}, **extra}
    p = tmp_path / f"{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def submit_long_job(cluster, tmp_path, total, out):
    """Submit a job over a `total`-frame video and return (job id, its status row) once some frames are written
    (or it ended)."""
    from jobs.demo import write_video
    from conftest import index_frame

    video = tmp_path / "long.mp4"
    write_video((index_frame(i, 144, 192) for i in range(total)), video, 24.0, gop=GOP)
    code, text = fpn("submit", spec_file(tmp_path, [video], out), "--address", cluster)
    job_id = submitted_id(text)
    deadline = time.time() + 600
    while time.time() < deadline:
        row = json.loads(fpn("status", job_id, "--address", cluster, "--format", "json")[1])
        if (row.get("frames_done") or 0) > 0 or row["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    return job_id, row


PLANTED = ("PLANTEDKEY123", "PLANTEDSECRET456")


def test_submit_status_list_logs_on_two_nodes(cluster, cluster_dir, make_video, tmp_path):
    video = make_video("cluster64.mp4", 64, 16.0)
    out = tmp_path / "out"
    secrets = {"s3": {"key": PLANTED[0], "secret": PLANTED[1]}}  # never used: the inputs are local
    code, text = fpn("submit", spec_file(tmp_path, [video, SOAP], out, storage_options=secrets),
                     "--address", cluster)
    assert code == 0, text
    job_id = submitted_id(text)
    assert "fpn status" in text and "fpn logs" in text
    row = wait_for(cluster, job_id, {"SUCCEEDED", "FAILED"})
    assert row["status"] == "SUCCEEDED", fpn("logs", job_id, "--address", cluster)[1]
    assert row["frames_done"] == row["frames_planned"] == 65
    t = frames(out)
    ids = t.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids)) == 65
    assert len(detector_nodes(cluster)) == 2  # one detector actor on each node

    code, text = fpn("status", job_id, "--address", cluster)
    assert code == 0 and "SUCCEEDED" in text and "65 / 65 (100%)" in text
    code, text = fpn("list", "--address", cluster, "--format", "json")
    assert job_id in [r["job_id"] for r in json.loads(text)]
    code, text = fpn("logs", job_id, "--address", cluster)
    assert code == 0 and "succeeded: 65 frames" in text
    for cmd in ("status", "resume"):  # a mistyped output name reaches the cluster as a job id: both are said
        code, text = fpn(cmd, "ouptut", "--address", cluster)
        assert code == 1 and f"job ouptut: not found on {cluster}, and there is no output ouptut here" in text, text
    assert_no_planted_secret(cluster, cluster_dir, job_id, out)


def assert_no_planted_secret(address, cluster_dir, job_id, out):
    """The storage keys reached the job through its environment alone, sealed: not its metadata, entrypoint,
    logs, status, output files, the spec in its working directory or any file of the cluster (Ray's logs)."""
    from jobs.manager import SECRETS_ENV, client

    info = client(address).get_job_info(job_id)
    assert SECRETS_ENV in info.runtime_env["env_vars"]  # the one channel they travel by
    seen = {"metadata": json.dumps(info.metadata), "entrypoint": info.entrypoint,
            "logs": fpn("logs", job_id, "--address", address)[1],
            "status": fpn("status", job_id, "--address", address, "--format", "json")[1],
            "list": fpn("list", "--address", address, "--format", "json")[1]}
    assert info.runtime_env["env_vars"][SECRETS_ENV].startswith("fernet:")  # sealed with the cluster token
    for f in [*Path(out).rglob("*"), *cluster_dir.rglob("*")]:  # the output; every node's logs, working dirs
        if f.is_file() and not f.is_symlink() and not f.is_socket():
            seen[str(f)] = f.read_bytes().decode("latin-1")
    specs = [f for f in seen if "working_dir" in f and f.endswith("spec.yaml")]
    assert specs, "no unpacked working dir found"
    assert any(f.endswith("runtime_env_agent.log") for f in seen), "no runtime env agent log found"
    assert "***" in seen["metadata"]  # the placeholders are there instead
    leaks = [(p, where) for where, text in seen.items() for p in PLANTED if p in text]
    record("`fpn submit` with storage keys in the spec (2-node cluster)",
           f"keys travel in the job's environment only, sealed; searched {len(seen)} places (metadata, entrypoint, "
           "job logs, status, list, output, every file of the cluster's temp dir)",
           expected=65, frames=frames(out), errors=0, secrets_found=len(leaks), exit_code=0)
    assert not leaks, f"a planted secret leaked: {leaks}"


def test_resume_of_a_running_job_is_refused(cluster, tmp_path):
    from jobs.demo import write_video
    from conftest import index_frame

    video = tmp_path / "long.mp4"
    write_video((index_frame(i, 144, 192) for i in range(240)), video, 24.0, gop=GOP)
    code, text = fpn("submit", spec_file(tmp_path, [video], tmp_path / "out"), "--address", cluster)
    job_id = submitted_id(text)
    wait_for(cluster, job_id, {"RUNNING"})
    jobs = len(json.loads(fpn("list", "--address", cluster, "--format", "json")[1]))
    code, text = fpn("resume", job_id, "--address", cluster)
    assert code == 1 and f"job {job_id} is still RUNNING: cancel it first (fpn cancel {job_id})" in text
    assert len(json.loads(fpn("list", "--address", cluster, "--format", "json")[1])) == jobs  # nothing submitted
    code, text = fpn("cancel", job_id, "--address", cluster)
    assert code == 0 and "STOPPED" in text


def test_cancel_then_resume_writes_every_frame_once(cluster, tmp_path):
    total, out = 120, tmp_path / "out"
    job_id, row = submit_long_job(cluster, tmp_path, total, out)
    assert row["status"] == "RUNNING" and row["frames_planned"] == total
    code, text = fpn("cancel", job_id, "--address", cluster)
    assert code == 0 and "STOPPED" in text
    partial = frames(out).num_rows
    assert 0 < partial < total
    code, text = fpn("resume", job_id, "--address", cluster)
    assert code == 0, text
    new_id = submitted_id(text)
    row = wait_for(cluster, new_id, {"SUCCEEDED", "FAILED"})
    assert row["status"] == "SUCCEEDED"
    t = frames(out)
    assert sorted(t.column("frame_index").to_pylist()) == list(range(total))  # all, none twice
    record = json.loads((out / "_job.json").read_text())
    assert record["runs"] == 2 and record["skipped_frames"] >= partial
    code, text = fpn("list", "--address", cluster)
    assert job_id in text and new_id in text and "STOPPED" in text
    # the cancelled job is listed as cancelled (it read "succeeded", the state its resume wrote into the output)
    listed = {r["job_id"]: r for r in json.loads(fpn("list", "--address", cluster, "--format", "json")[1])}
    assert (listed[job_id]["state"], listed[new_id]["state"]) == ("cancelled", "succeeded"), listed


def _kill_worker_node(name: str = "node_worker_1") -> int:
    """SIGKILL the raylet of the worker node with the custom resource `name`, and every process under it (its
    workers, the detector actor there), as when that machine dies. Returns how many processes were killed."""
    import psutil

    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if "raylet" in (p.info["name"] or "") and name in " ".join(p.info["cmdline"] or [])]
    assert len(raylets) == 1, raylets
    victims = [raylets[0], *raylets[0].children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(victims)


def test_a_worker_node_lost_mid_job_loses_no_frame(cluster, tmp_path):
    """The cluster has one node less afterwards (the next test counts the nodes). The job finishes on the head (Ray
    retries the lost tasks and restarts the detector actor there) or, where it fails, a resume completes it:
    every frame once either way."""
    total, out = 120, tmp_path / "out"
    job_id, row = submit_long_job(cluster, tmp_path, total, out)
    assert row["status"] == "RUNNING" and len(detector_nodes(cluster)) == 2
    killed = _kill_worker_node()
    row = wait_for(cluster, job_id, {"SUCCEEDED", "FAILED"}, timeout=600)
    print(f"\nworker node lost: {killed} processes killed; job {row['status']}, {row.get('frames_done')} frames")
    first = row["status"]
    if row["status"] != "SUCCEEDED":
        code, text = fpn("resume", job_id, "--address", cluster)
        assert code == 0, text
        row = wait_for(cluster, submitted_id(text), {"SUCCEEDED", "FAILED"}, timeout=600)
    assert row["status"] == "SUCCEEDED", row
    t = frames(out)
    record("worker node of a 2-node cluster SIGKILLed mid-job (raylet and its workers)",
           f"{first}: Ray re-ran lost tasks, restarted the detector on the head", expected=total, frames=t,
           errors=0, exit_code=0)
    assert sorted(t.column("frame_index").to_pylist()) == list(range(total))  # all, none twice


def _mount_namespace_of_its_own() -> bool:
    """Whether this process may start one and mount a tmpfs in it (root, or a user namespace that allows it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "fpn-probe", d],
                              capture_output=True).returncode == 0


def _join_from_a_filesystem_of_its_own(gcs_port: int, hidden: Path) -> None:
    """Start a Ray node (custom resource node_private) that joins the cluster from a mount namespace of its own in
    which `hidden` is an empty tmpfs: a machine that sees none of the driver's files there (it shares the code, as
    nodes of one image do)."""
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    script = ('mount -t tmpfs -o size=1m fpn-private "$1" && '
              'ray start --address "127.0.0.1:$2" --node-ip-address 127.0.0.1 --num-cpus 1 --num-gpus 0 '
              '--resources \'{"node_private": 1}\' --min-worker-port 25000 --max-worker-port 25999 '
              '--dashboard-agent-listen-port "$3" >/dev/null 2>&1 && echo joined')
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "bash", str(hidden),
                        str(gcs_port), str(_free_port())], capture_output=True, text=True, env=env, timeout=180)
    assert p.stdout.split() == ["joined"], (p.stdout, p.stderr)


@pytest.mark.skipif(not _mount_namespace_of_its_own(), reason="needs `unshare --mount` and a tmpfs mount in it")
def test_training_on_nodes_that_share_no_files_with_the_driver(cluster, gcs_port, tmp_path):
    """`fpn train --workers N --address` with a worker on a node that cannot see the driver's annotations, images,
    `--init` checkpoint or temporary directory (a mount namespace of its own, where the test's directory is empty):
    the driver hands the workers the data and weights through Ray and gets the checkpoint back the same way, so the
    run neither needs a shared filesystem nor leaves its Ray Train directory behind. One worker per live node (each
    offers 1 CPU), so one rank runs on that node."""
    import sys
    import tempfile

    from fpn_model.weights import load_checkpoint, read_config
    from test_cli import _soap_crop

    _soap_crop(tmp_path)
    common = ["train", "--train", str(tmp_path / "crop.xml"), "--single-class", "Tree", "--batch-size", "1", "--crop", "96"]
    r = CliRunner().invoke(cli, [*common, "--steps", "1", "--seed", "7", "-o", str(tmp_path / "base.safetensors")])
    assert r.exit_code == 0, r.output
    _join_from_a_filesystem_of_its_own(gcs_port, tmp_path)
    try:
        ray = str(Path(os.sys.executable).parent / "ray")
        listed = subprocess.run([ray, "list", "nodes", "--address", cluster, "--format", "json", "--detail"],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
        nodes = [n for n in json.loads(listed.stdout) if n["state"] == "ALIVE"]
        private = [n["node_id"] for n in nodes if "node_private" in n["resources_total"]]
        assert len(private) == 1 and len(nodes) >= 2, nodes
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # the driver's TMPDIR (Ray Train's directory goes there)
        p = subprocess.run([sys.executable, "-m", "jobs.cli", *common, "--steps", "2", "--workers", str(len(nodes)),
                            "--address", f"127.0.0.1:{gcs_port}", "--init", "base.safetensors", "--ema", "0.9",
                            "-o", "dist.safetensors"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)})
        workers = subprocess.run([ray, "list", "actors", "--address", cluster, "--format", "json", "--detail",
                                  "--limit", "1000", "--filter", "class_name=RayTrainWorker"],
                                 capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "RAY_AUTH_MODE": "token"})
    finally:
        _kill_worker_node("node_private")  # its raylet and the processes under it
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(no validation: the last weights)" in p.stdout and f"on {len(nodes)} workers" in p.stdout, p.stdout
    assert "step      1  loss" in p.stderr, p.stderr[-2000:]  # rank 0's progress, printed by the driver
    assert private[0] in {a["node_id"] for a in json.loads(workers.stdout)}  # a rank ran on the private node
    assert list(tmp.iterdir()) == []  # Ray Train's directory of the run, removed
    model, base = load_checkpoint(tmp_path / "dist.safetensors"), load_checkpoint(tmp_path / "base.safetensors")
    assert read_config(tmp_path / "dist.safetensors")[1]["train"]["workers"] == len(nodes)
    tuned, init = model.state_dict(), base.state_dict()
    moved = sum(float((tuned[k] - init[k]).double().norm()) ** 2 for k in tuned if tuned[k].is_floating_point())
    assert 0 < moved ** 0.5 < 0.1 * sum(float(t.double().norm()) ** 2 for t in init.values()) ** 0.5  # from --init
