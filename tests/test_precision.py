"""Precisions per device: evaluated by `fpn eval --record`, recorded in the checkpoint, the default a job runs."""
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import SOAP_XML
from fpn_model.evaluate import choose_precision
from fpn_model.weights import default_precision, file_sha256, read_precision, record_precision
from fpn_model.zoo import resolve
from jobs.cli import cli


def test_the_default_is_the_best_approximate_precision_within_exacts_spread():
    exact = {"AP50": 0.35, "AP50_sd": 0.04}
    assert choose_precision({"exact": exact, "bf16": {"AP50": 0.33}, "fp16": {"AP50": 0.357}}) == "fp16"
    assert choose_precision({"exact": exact, "bf16": {"AP50": 0.30}, "int8": {"AP50": 0.312}}) == "int8"
    assert choose_precision({"exact": exact, "bf16": {"AP50": 0.30}}) == "exact"  # below 0.35 - 0.04


def test_a_record_keeps_the_weights_and_sets_the_default_per_device(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(resolve("trees"), ckpt)
    assert read_precision(ckpt) == {} and default_precision(ckpt, "cuda") == "exact"
    from safetensors.torch import load_file

    before = load_file(str(ckpt))
    record_precision(ckpt, {"default": {"cuda": "fp16"}, "evaluated": {}, "how": "test"})
    assert default_precision(ckpt, "cuda") == "fp16" and default_precision(ckpt, "cpu") == "exact"
    after = load_file(str(ckpt))
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


def test_fpn_eval_record_evaluates_every_cpu_precision_and_records_its_choice(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(resolve("trees"), ckpt)
    r = CliRunner().invoke(cli, ["eval", str(ckpt), str(SOAP_XML), "--single-class", "Tree", "--views", "8",
                                 "--record", "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    rec = read_precision(ckpt)
    assert set(rec["evaluated"]) == {"cpu/exact", "cpu/int8", "cpu/bf16"}
    per = {p: {k: metrics[f"{p}/{k}"] for k in ("AP50", "AP50_sd")} for p in ("exact", "int8", "bf16")}
    assert rec["default"] == {"cpu": choose_precision(per)}
    assert "--device cpu" in rec["how"]


def test_eval_record_needs_eight_views_and_cuda_needs_a_gpu(tmp_path):
    r = CliRunner().invoke(cli, ["eval", "trees", str(SOAP_XML), "--record"])
    assert r.exit_code == 2 and "--record needs --views 8" in r.output
    import torch

    if not torch.cuda.is_available():
        r = CliRunner().invoke(cli, ["eval", "trees", str(SOAP_XML), "--device", "cuda"])
        assert r.exit_code == 2 and "sees no CUDA device here" in r.output
    r = CliRunner().invoke(cli, ["eval", "trees", str(SOAP_XML), "--precision", "fp16"])
    assert r.exit_code != 0 and "fp16 is for GPUs" in r.output
    assert file_sha256(resolve("trees"))  # the bundled checkpoint is untouched by any of this


@pytest.mark.slow
def test_a_job_runs_the_precision_its_checkpoint_records_unless_told(ray_session, tmp_path):
    from conftest import SOAP
    from jobs.runner import run
    from jobs.spec import plan_from_dict

    ckpt = tmp_path / "m.safetensors"
    shutil.copy(resolve("trees"), ckpt)
    record_precision(ckpt, {"default": {"cpu": "bf16"}, "evaluated": {}, "how": "test"})
    doc = run(plan_from_dict({"inputs": [str(SOAP)], "output": str(tmp_path / "out"), "model": str(ckpt)}))
    assert doc["state"] == "succeeded" and doc["resources"]["precision"] == "bf16"
    assert doc["spec"]["resources"]["precision"] == "bf16"  # a resume runs what this run ran
