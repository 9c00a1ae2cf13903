"""Resource requests checked against the cluster before any work, and the detectors' torch threads."""
import pytest
from click.testing import CliRunner

from conftest import SOAP
from jobs.cli import cli
from jobs.spec import plan_from_dict
from pipeline.plan import Resources
from pipeline.sizing import GPU_CALLS, fit

TWO_CORES = [{"CPU": 2.0}]


def test_one_detector_on_a_two_core_node_gets_both_cores():
    assert fit(Resources(), TWO_CORES).threads == 2  # not the floor of its 1-CPU reservation
    assert fit(Resources(num_detectors=2, cpus_per_detector=0.7), TWO_CORES).threads == 1
    assert fit(Resources(), [{"CPU": 16.0}]).threads == 16
    four_nodes = [{"CPU": 8.0}] * 4
    assert fit(Resources(num_detectors=8, cpus_per_detector=2), four_nodes).threads == 4  # 2 per node


def test_a_cpu_detector_runs_a_batch_per_thread_up_to_max_calls():
    def calls(resources, nodes):
        f = fit(resources, nodes)
        return f.threads, f.calls

    assert calls(Resources(), TWO_CORES) == (2, 2)  # 2 batches side by side, 1 torch thread each
    assert calls(Resources(num_detectors=2, cpus_per_detector=0.7), TWO_CORES) == (1, 1)
    assert calls(Resources(), [{"CPU": 16.0}]) == (16, 4)  # MAX_CALLS batches of 4 threads
    assert calls(Resources(), [{"CPU": 5.5}]) == (5, 1)  # no even share: one batch of all 5 threads
    assert calls(Resources(calls_per_detector=1), TWO_CORES) == (2, 1)  # the spec says
    gpu = [{"CPU": 16.0, "GPU": 1.0}]
    assert calls(Resources(gpus_per_detector=1, cpus_per_detector=4), gpu) == (4, GPU_CALLS)  # one per CUDA stream
    assert calls(Resources(gpus_per_detector=1, calls_per_detector=1), gpu) == (1, 1)
    with pytest.raises(ValueError, match="calls_per_detector"):
        Resources(calls_per_detector=0)


def test_a_gpu_detector_keeps_its_cpu_reservation_as_threads():
    assert fit(Resources(gpus_per_detector=1, cpus_per_detector=4), [{"CPU": 16.0, "GPU": 1.0}]).threads == 4


@pytest.mark.parametrize("resources, nodes, says", [
    (Resources(num_detectors=2), TWO_CORES,
     "needs 2 detector(s) x 1 CPU + 0.5 CPU per decode task + 0.1 CPU for writing = 2.6 CPUs, and the cluster has 2"),
    (Resources(cpus_per_detector=2), TWO_CORES, "= 2.6 CPUs, and the cluster has 2"),
    (Resources(gpus_per_detector=1), TWO_CORES, "needs 1 detector(s) x 1 GPU = 1 GPUs, and the cluster has 0"),
    (Resources(cpus_per_detector=3), [{"CPU": 2.0}, {"CPU": 2.0}],
     "one detector needs 3 CPU and 0 GPU, and the largest node has 2 CPU and 0 GPU"),
])
def test_requests_the_cluster_cannot_hold_fail_naming_the_numbers(resources, nodes, says):
    with pytest.raises(ValueError) as e:
        fit(resources, nodes)
    assert says in str(e.value)


@pytest.mark.slow
def test_fpn_run_asking_for_more_than_the_node_fails_in_seconds_before_any_work(ray_session, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["run", str(SOAP), "-o", str(out), "--num-detectors", "2"])
    assert r.exit_code == 1 and "= 2.6 CPUs, and the cluster has 2" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()  # nothing written, no lease taken


def test_a_job_without_progress_is_reported_once_per_stall_naming_the_starved_stage(tmp_path):
    """The watchdog reads the real output's progress; the cluster's free resources are given, as Ray reports them."""
    from jobs.watchdog import Watchdog
    from pipeline.output import Output

    free, detected = {"CPU": 0.0}, [0]
    dog = Watchdog(Output(str(tmp_path / "out")), Resources(), stall_s=10,
                   cluster=lambda: (free, {"CPU": 2.0}), detected=lambda: detected[0])
    assert dog.check(now=90.0) is None  # the first poll sets the clock
    detected[0] = 8  # the detectors move on while their frames wait in a bundle to be written: no stall
    assert dog.check(now=100.0) is None
    assert dog.check(now=109.0) is None
    msg = dog.check(now=111.0)
    assert msg == ("no frame detected or written for 11 s: decoding is starved: 0 of 2 CPUs are free and a decode task needs 0.5 "
                   "(the detectors reserve 1); lower cpus_per_detector or num_detectors")
    assert dog.check(now=115.0) is None  # once per stall period
    free["CPU"] = 1.0
    assert "a decoder or the detector is slow or stuck" in dog.check(now=121.0)
    assert len(dog.warnings) == 2


def test_the_frame_counter_sums_every_detectors_copy_and_forgets_the_run_when_closed(ray_session):
    """The watchdog's count of detected frames: each detector process (a pickled copy) adds from its batches'
    threads under a key of its own in Ray's key-value store; the run's total sums them, apart from other jobs."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from pipeline.counter import FrameCounter

    run, other = FrameCounter(), FrameCounter()  # two jobs on one cluster
    here = pickle.loads(pickle.dumps(run))
    with ThreadPoolExecutor(4) as pool:  # one detector's batches side by side
        list(pool.map(here.add, [1] * 40))
    ray.get(ray.remote(lambda c: (c.add(5), c.add(2))).remote(run))  # another detector, in a worker process
    other.add(100)
    # events the run's detectors count, apart from its frames and from other runs'
    assert ray.get(ray.remote(lambda c: c.note("device_lost")).remote(run)) == 1
    assert here.note("device_lost") == 2 and other.events("device_lost") == 0 and run.events("device_lost") == 2
    assert (run.total(), other.total()) == (47, 100)
    run.close()
    assert (run.total(), other.total(), run.events("device_lost")) == (0, 100, 0)
    other.close()


def _embedded_ray(**env_vars) -> dict:
    """In a fresh process (this one may hold Ray): `init_ray()`, then a task's niceness, whether its worker had
    imported (or was importing) pipeline.plan and Ray Data before the task came, the names of the Python scripts the
    driver's child processes run (Ray's daemons), whether its dashboard agent runs minimal and the raylet's flags
    that decide what it waits for as it starts (with PRESTART_WORKERS set to 1)."""
    import json
    import os
    import subprocess
    import sys

    code = """if True:
        import json, os, sys, psutil, ray
        import jobs.runner
        from jobs.runner import init_ray, stop_ray
        jobs.runner.PRESTART_WORKERS = 1
        init_ray()
        nice, ready = ray.get(ray.remote(lambda: (os.nice(0), {"pipeline.plan", "ray.data"} <= set(sys.modules)))
                              .remote())
        cmds = [p.cmdline() for p in psutil.Process().children(recursive=True)]
        stop_ray()
        print(json.dumps({"nice": nice, "preloaded": ready,
                          "scripts": sorted({os.path.basename(a) for c in cmds for a in c if a.endswith(".py")}),
                          "minimal_agent": any(a.startswith("--dashboard_agent_command=") and "--minimal" in a
                                               for c in cmds for a in c),
                          "raylet": dict((k[2:].replace("-", "_"), v) for c in cmds
                                         if c and c[0].endswith("/raylet") for k, _, v in (a.partition("=") for a in c)
                                         if k.endswith("port") or "prestart" in k)
                          }))"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness", "FPN_RAY_FULL_NODE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, **env_vars}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_embedded_ray_runs_its_workers_at_the_drivers_priority_without_daemons_of_other_clients():
    """Ray's default worker niceness (15) puts a detector's threads below Ray's own daemons (benchmarks/
    worker_niceness.py); the embedded Ray of `fpn run` starts them at 0, with what a job's workers import on their
    first call imported ahead. It starts no autoscaler monitor, log monitor or API server, and its dashboard agent
    minimal, and its raylet waits for neither agent as it starts (jobs.runner._lean_local_node): FPN_RAY_FULL_NODE=1
    brings them back."""
    daemons = {"monitor.py", "log_monitor.py", "dashboard.py"}
    lean = _embedded_ray()
    assert lean["nice"] == 0 and lean["preloaded"] and lean["minimal_agent"]
    assert not set(lean["scripts"]) & daemons, lean["scripts"]
    # the raylet waits for none of its agents' port files (the dashboard agent's: none, a port for the runtime-env
    # agent's) and starts PRESTART_WORKERS workers ahead, not one per CPU
    r = lean["raylet"]
    assert (r["metrics_agent_port"], r["metrics_export_port"], r["dashboard_agent_listen_port"]) == ("-1",) * 3, r
    assert 1024 < int(r["runtime_env_agent_port"]) < 65536 and r["num_prestart_python_workers"] == "1", r
    full = _embedded_ray(FPN_RAY_FULL_NODE="1")
    assert set(full["scripts"]) >= daemons and not full["minimal_agent"]
    assert full["raylet"]["runtime_env_agent_port"] == "0" and full["raylet"]["num_prestart_python_workers"] != "1"


def test_embedded_ray_keeps_the_workers_of_a_jobs_short_tasks_between_them():
    """Waves of 5 short tasks of a quarter CPU each, idle 2 s between waves (a decode task's reservation is half a
    CPU, a write's a tenth): the embedded node keeps their workers (jobs.runner.kept_workers), so later waves run on
    the same processes. With Ray's default (one idle worker kept per CPU: 2 on CI's node) the raylet ended the
    workers idle for over a second, and each wave started fresh ones that imported Ray Data again."""
    import json
    import os
    import subprocess
    import sys

    from jobs.runner import kept_workers

    assert kept_workers(2) == 8 and kept_workers(16) == 36 and kept_workers(2, decode_cpus=0.25) == 12
    code = """if True:
        import asyncio, json, os, time, ray
        from jobs.runner import init_ray, stop_ray
        init_ray()

        @ray.remote(num_cpus=0)
        class Barrier:  # a wave's tasks all hold a worker at once
            def __init__(self):
                self.seen = {}
            async def arrive(self, wave, n):
                self.seen[wave] = self.seen.get(wave, 0) + 1
                while self.seen[wave] < n:
                    await asyncio.sleep(0.05)

        @ray.remote(num_cpus=0.25)
        def task(barrier, wave):
            ray.get(barrier.arrive.remote(wave, 5))
            return os.getpid()

        barrier = Barrier.remote()
        waves = []
        for wave in range(3):
            waves.append(sorted(set(ray.get([task.remote(barrier, wave) for _ in range(5)]))))
            time.sleep(2.0)  # idle: Ray ends a worker idle for 1 s while the node runs more than it keeps
        stop_ray()
        print(json.dumps(waves))"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    waves = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(len(w) == 5 for w in waves), waves
    assert waves[1] == waves[2] == waves[0], waves  # the same 5 processes each time


def test_embedded_node_keeps_workers_for_the_cpus_ray_gives_it(monkeypatch):
    """The idle workers kept are counted from the CPUs Ray gives the node it starts (a container's CPU quota), not
    the host's (os.cpu_count()); a user's RAY_num_workers_soft_limit wins."""
    import ray._private.utils

    from jobs.runner import _embedded_system_config, _node_cpus, kept_workers

    assert _node_cpus() == ray._private.utils.get_num_cpus()
    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **_: 3)  # a 3-CPU quota on this host
    assert _embedded_system_config()["num_workers_soft_limit"] == kept_workers(3) == 10
    monkeypatch.setenv("RAY_num_workers_soft_limit", "-1")
    assert "num_workers_soft_limit" not in _embedded_system_config()


def test_ray_data_imported_beside_ray_init_shares_no_module_with_it():
    """`fpn run` imports Ray Data on a thread while `ray.init` starts the embedded node (jobs.runner.init_ray's
    `alongside`), once the modules `ray.init` imports as it runs (RAY_INIT_IMPORTS) are imported: from the CLI's
    state at that point, what `ray.init` then imports and what importing Ray Data imports have nothing in common,
    so no module is imported on both threads at once."""
    import json
    import subprocess
    import sys

    pre = """if True:
        import importlib, json, sys
        import jobs.cli, jobs.progress, jobs.runner
        import ray
        for name in jobs.runner.RAY_INIT_IMPORTS:
            importlib.import_module(name)
        before = set(sys.modules)
        """
    steps = {"ray.init": "jobs.runner._init_ray(ray, None); jobs.runner.stop_ray()",
             "ray.data": "jobs.cli._ray_data_setup()"}
    new = {}
    for name, step in steps.items():
        code = f"{pre}{step}\n        print(json.dumps(sorted(set(sys.modules) - before)))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
        new[name] = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert len(new["ray.data"]) > 100  # Ray Data was imported there
    assert not new["ray.init"] & new["ray.data"], sorted(new["ray.init"] & new["ray.data"])


def test_a_cpu_detectors_calls_share_its_threads_among_those_running_and_its_cpu_time():
    """Each call of a CPU detector sets its own torch thread count (OpenMP's is per thread) as it enters the
    model's modules: all of the detector's threads while it runs alone, an even share while others run beside it.
    Each call's CPU time is its share of the process's (torch's threads of a call are not the calling thread)."""
    import threading
    import time

    import torch

    from pipeline.detect import _CallShare

    seen: dict[str, list[int]] = {}
    both_in = threading.Barrier(2)
    b_first, a_done = threading.Event(), threading.Event()

    class Step(torch.nn.Module):
        def forward(self, who):
            seen.setdefault(who, []).append(torch.get_num_threads())  # set by the hook before this step
            if who == "b" and len(seen["b"]) == 1:
                b_first.set()
                a_done.wait(timeout=10)  # b's next step once a has ended
            return who

    model = torch.nn.Sequential(Step(), Step())
    share = _CallShare(model, threads=2)
    cpu: dict[str, float] = {}

    def call(who):
        torch.set_num_threads(1)  # what a detector's call threads start with
        with share.call():
            if who != "alone":
                both_in.wait(timeout=10)  # both calls running before either's first step
            model(who)
            if who == "a":
                b_first.wait(timeout=10)  # a ends after b's first step
            if who == "alone":
                end = time.process_time() + 0.3
                while time.process_time() < end:
                    pass
            cpu[who] = share.clock()
        if who == "a":
            a_done.set()

    t = threading.Thread(target=call, args=("alone",))
    t.start()
    t.join()
    pair = [threading.Thread(target=call, args=(w,)) for w in ("a", "b")]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    assert seen["alone"] == [2, 2]  # alone: both threads
    assert seen["a"] == [1, 1] and seen["b"] == [1, 2]  # side by side 1 each; b has both once a has ended
    assert 0.25 < cpu["alone"] < 0.6, cpu
    assert cpu["a"] < 0.2 and cpu["b"] < 0.2, cpu


def test_a_detector_pool_is_fixed_or_autoscales_up_to_max_detectors():
    from pipeline.plan import detector_pool

    fixed = detector_pool(Resources(num_detectors=2), 1)
    assert (fixed.min_size, fixed.max_size) == (2, 2)
    grows = detector_pool(Resources(num_detectors=1, max_detectors=4, gpus_per_detector=1), 2)
    assert (grows.min_size, grows.max_size, grows.max_concurrent_calls_per_actor) == (1, 4, 2)
    with pytest.raises(ValueError, match="max_detectors must be >= num_detectors"):
        Resources(num_detectors=2, max_detectors=1)
    # fractional GPUs: two detectors share one; three do not fit
    assert fit(Resources(num_detectors=2, gpus_per_detector=0.5), [{"CPU": 8.0, "GPU": 1.0}]).calls == GPU_CALLS
    with pytest.raises(ValueError, match="x 0.5 GPU = 1.5 GPUs, and the cluster has 1"):
        fit(Resources(num_detectors=3, gpus_per_detector=0.5), [{"CPU": 8.0, "GPU": 1.0}])


def test_a_job_that_leaves_the_device_open_gets_one_detector_per_gpu():
    def decided(resources, nodes):
        r = fit(resources, nodes).resources
        return r.num_detectors, r.gpus_per_detector, r.device_type

    two_gpus = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]
    assert decided(Resources(), two_gpus) == (2, 1.0, "cuda")
    assert decided(Resources(), TWO_CORES) == (1, 0.0, "cpu")
    assert decided(Resources(gpus_per_detector=0), two_gpus) == (1, 0.0, "cpu")  # told: the CPU
    assert decided(Resources(gpus_per_detector=0.5), two_gpus) == (4, 0.5, "cuda")  # two share each GPU
    assert decided(Resources(max_detectors=1), two_gpus) == (1, 1.0, "cuda")  # a pool starts within its bounds
    assert decided(Resources(num_detectors=1), two_gpus) == (1, 1.0, "cuda")
    record = fit(Resources(), two_gpus).as_record()
    assert record["num_detectors"] == 2 and record["gpus_per_detector"] == 1.0
    with pytest.raises(ValueError, match="needs 3 detector\\(s\\) x 1 GPU = 3 GPUs, and the cluster has 2"):
        fit(Resources(num_detectors=3), two_gpus)
    # a precision is checked against the device once it is decided
    assert Resources(precision="fp16").precision == "fp16"
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        fit(Resources(precision="fp16"), TWO_CORES)


@pytest.mark.parametrize("decode_cpus", [0.25, 0.5, 1.0])
def test_a_block_per_batch_runs_inside_the_decode_tasks_at_any_decode_reservation(decode_cpus, ray_session, tmp_path,
                                                                                 capsys):
    """The split of each unit's frames into a block per batch is fused into the decode tasks: as a stage of its
    own (Ray Data's default for a repartition after a map with other remote args) its tasks reserve a whole CPU,
    which a node that detectors fill never has free, and the job hangs (tests/test_cluster.py did)."""
    from pipeline.output import Output
    from pipeline.plan import build_dataset
    from pipeline.sources import WorkUnit

    plan = plan_from_dict({"inputs": ["a.mp4"], "output": str(tmp_path), "batch_size": 4,
                           "resources": {"decode_cpus": decode_cpus}})
    build_dataset(plan, Output(plan.output), [WorkUnit("a.mp4", "a.mp4", "video", 0, 8, 8).to_row()]).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(_Decode)->StreamingRepartition[num_rows_per_block=4," in physical
    assert physical.count("TaskPoolMapOperator") == 1, physical


def test_images_share_decode_tasks_and_video_segments_and_raster_windows_have_one_each():
    """A block (one decode task) per image made 30,000 small images wait 52 s for their first detection and ran at
    ~40 images/s with a model that does nothing."""
    from pipeline.plan import IMAGES_PER_BLOCK, _unit_blocks
    from pipeline.sources import WorkUnit

    def units(kinds):
        return [WorkUnit(f"{k}{i}", f"{k}{i}", {"i": "image", "v": "video", "r": "raster"}[k]).to_row()
                for i, k in enumerate(kinds)]

    blocks = _unit_blocks(units("i" * 10 + "v" + "i" * 7 + "rr"), cpus=2)  # 17 images: 3 a block, ~4 per CPU
    assert [[u["uri"] for u in b] for b in blocks] == [
        ["i0", "i1", "i2"], ["i3", "i4", "i5"], ["i6", "i7", "i8"], ["v10"], ["i9", "i11", "i12"],
        ["i13", "i14", "i15"], ["r18"], ["r19"], ["i16", "i17"]]
    many = _unit_blocks(units("i" * 30000), cpus=2)
    assert len(many) == 469 and {len(b) for b in many} == {IMAGES_PER_BLOCK, 30000 % IMAGES_PER_BLOCK}
    assert [len(b) for b in _unit_blocks(units("iii"), cpus=16)] == [1, 1, 1]
    assert _unit_blocks([], cpus=2) == []


def test_embedded_ray_data_starts_no_helpers_that_serve_other_nodes_and_its_workers_keep_freed_memory():
    """On the embedded one-node cluster (`pipeline.raydata.one_node_execution`) Ray Data executes an actor pool
    without its autoscaling coordinator (it asks for nodes no one can add), actor-location tracker, statistics
    actor and usage-collection actor, Python processes that started in the seconds a job's detector does; the
    control execution after it starts the first three.
    The node's workers start with the detectors' malloc settings (a detector needs no runtime_env of its own),
    which the driver keeps out of its own environment."""
    import json
    import os
    import subprocess
    import sys

    code = """if True:
        import json, os, ray, ray.data
        from jobs.runner import init_ray, stop_ray
        from pipeline.raydata import one_node_execution
        init_ray()
        arena = ray.get(ray.remote(lambda: os.environ.get("MALLOC_ARENA_MAX")).remote())
        names = lambda: sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
        class Double:
            def __call__(self, batch):
                return {"x": batch["id"] * 2}
        doubled = lambda: ray.data.range(8, override_num_blocks=2).map_batches(Double, concurrency=1).take_all()
        with one_node_execution():
            rows = doubled()
        inside = names()
        doubled()
        after = names()
        stop_ray()
        print(json.dumps({"arena": arena, "driver": os.environ.get("MALLOC_ARENA_MAX"), "inside": inside,
                          "after": after, "sum": sum(r["x"] for r in rows)}))"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MALLOC_ARENA_MAX", "FPN_KEEP_FREED_MEMORY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sum"] == 56
    helpers = {"AutoscalingCoordinator", "ActorLocationTracker", "datasets_stats_actor"}
    assert not (helpers | {"DataUsageCollectionActor"}) & set(got["inside"]), got["inside"]
    assert helpers <= set(got["after"]), got["after"]
    assert (got["arena"], got["driver"]) == ("1", None)


def test_a_detector_has_a_runtime_env_only_for_what_the_workers_lack(ray_session, tmp_path, monkeypatch):
    """A runtime_env of its own makes Ray start a detector in a fresh process; where the cluster's workers start
    with the malloc settings already (the embedded node), it has none and takes a worker Ray started ahead."""
    monkeypatch.delenv("FPN_KEEP_FREED_MEMORY", raising=False)  # the settings on, whatever the caller's shell says
    from fpn_model.memory import keep_freed_memory_env
    from pipeline.output import Output
    from pipeline.plan import build_dataset
    from pipeline.sources import WorkUnit

    plan = plan_from_dict({"inputs": ["a.mp4"], "output": str(tmp_path), "batch_size": 4})
    units = [WorkUnit("a.mp4", "a.mp4", "video", 0, 8, 8).to_row()]

    def runtime_env(**kwargs):
        return build_dataset(plan, Output(plan.output), units, **kwargs)._logical_plan.dag.ray_remote_args.get(
            "runtime_env")

    assert runtime_env() == {"env_vars": keep_freed_memory_env()}
    assert runtime_env(worker_env=keep_freed_memory_env()) is None


def test_batch_size_auto_fits_the_memory_of_a_detectors_gpu(tmp_path, monkeypatch, caplog):
    """`batch_size: auto`: on a GPU as many frames as 0.6 of the detector's memory holds for each call in flight
    (0.5 GiB a model-input megapixel in fp32, 0.4 in bf16/fp16: measured on an H200), at most 16; on CPUs 8.
    The memory comes from nvidia-smi for the GPU the process sees; no GPU, no answer."""
    import os

    from fpn_model.config import preset
    from jobs import runner
    from pipeline.sizing import auto_batch, gpu_memory_gib, model_input_mpx

    r50 = preset("faster_rcnn_r50_fpn", num_classes=2)  # torchvision's resize rule: 800 x 1333 at most
    assert model_input_mpx(r50, None) == pytest.approx(1.0664)
    assert model_input_mpx(r50, 512) == pytest.approx(0.262144)
    small = preset("small", num_classes=2)  # a fixed scale: tiles of 1024, else a 1080p frame
    assert model_input_mpx(small, 1024) == pytest.approx(1.048576)
    assert model_input_mpx(small, None) == pytest.approx(2.0736)
    assert auto_batch(80.0, calls=2, mpx=1.0664, precision="exact") == 16  # capped
    assert auto_batch(16.0, calls=2, mpx=1.0664, precision="exact") == 9
    assert auto_batch(16.0, calls=2, mpx=1.0664, precision="bf16") == 11
    assert auto_batch(2.0, calls=2, mpx=1.0664, precision="exact") == 1
    assert auto_batch(None, calls=2, mpx=1.0664, precision="exact") == 8

    smi = tmp_path / "nvidia-smi"  # answers for the device it is asked about
    smi.write_text('#!/bin/sh\ncase "$*" in *--id=1*) echo 16384;; *) echo 81559;; esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_memory_gib() == 79.65
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert gpu_memory_gib() == 16.0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_memory_gib() is None

    cfg = preset("trees", num_classes=2)
    cpu = plan_from_dict({"inputs": [str(SOAP)], "output": str(tmp_path / "o"), "model": "trees",
                          "batch_size": "auto"})
    plan, record = runner.ask_batch(cpu, cfg, calls=2)()
    assert plan.batch_size == 8 and record["gpu_memory_gib"] is None and record["batch_size"] == 8
    gpu = plan_from_dict({"inputs": [str(SOAP)], "output": str(tmp_path / "o"), "model": "trees",
                          "batch_size": "auto", "resources": {"gpus_per_detector": 0.5, "precision": "fp16"}})
    asked = []
    monkeypatch.setattr(runner, "ask_detector_gpu_memory", lambda g: asked.append(g) or (lambda: 40.0))
    decide = runner.ask_batch(gpu, cfg, calls=2)
    assert asked == [0.5]  # asked at once, the answer awaited when the batch size is decided
    plan, record = decide()
    mpx = model_input_mpx(cfg, 1024)
    assert asked == [0.5] and plan.batch_size == min(16, int(0.6 * 40.0 / (2 * 0.4 * mpx)))
    assert record == {"batch_size": plan.batch_size, "gpu_memory_gib": 40.0, "model_input_mpx": round(mpx, 3),
                      "calls": 2}
    monkeypatch.setattr(runner, "ask_detector_gpu_memory", lambda g: lambda: None)  # no GPU answered
    with caplog.at_level("WARNING", logger="jobs.runner"):
        assert runner.ask_batch(gpu, cfg, calls=2)()[0].batch_size == 8
    assert "no GPU told its memory" in caplog.text
    assert runner.ask_batch(plan, cfg, calls=2)() == (plan, None)  # a number is kept


def test_a_batch_size_is_a_number_or_auto():
    from jobs.spec import SpecError

    with pytest.raises(SpecError, match="batch_size must be a number >= 1 or auto, got 'big'"):
        plan_from_dict({"inputs": [str(SOAP)], "output": "o", "model": "trees", "batch_size": "big"})
    with pytest.raises(SpecError, match="batch_size must be >= 1, got 0"):
        plan_from_dict({"inputs": [str(SOAP)], "output": "o", "model": "trees", "batch_size": 0})
    r = CliRunner().invoke(cli, ["run", str(SOAP), "-o", "o", "--batch-size", "big"])
    assert r.exit_code == 2 and "'big' is neither a whole number nor auto" in r.output


@pytest.mark.slow
def test_a_job_with_batch_size_auto_records_the_choice(ray_session, tmp_path):
    import json

    from jobs.runner import run

    doc = run(plan_from_dict({"inputs": [str(SOAP)], "output": str(tmp_path / "out"), "model": "trees",
                              "batch_size": "auto"}))
    assert doc["state"] == "succeeded" and doc["frames"] == 1
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record["spec"]["batch_size"] == 8  # a resume runs what this run ran
    assert record["resources"]["batch_size_auto"] == {"batch_size": 8, "gpu_memory_gib": None,
                                                      "model_input_mpx": 1.049, "calls": 2}
