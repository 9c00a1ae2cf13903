"""fpn_model imports torchvision without TorchDynamo (fpn_model._imports), and nothing of torch's breaks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _fresh(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (this one has imported torch already); it prints one JSON object."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


LOAD_MODEL = """
import json, sys
import pipeline.detect  # what a detector actor imports
import torch, torchvision
from torchvision.ops import roi_align
before = "torch._dynamo" in sys.modules
x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
out = roi_align(x, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=2).flatten().tolist()
after_forward = "torch._dynamo" in sys.modules
placeholder = sys.modules["torchvision.ops.roi_align"].is_compile_supported("cpu")
import torch._dynamo.utils as real
print(json.dumps({"dynamo_at_import": before, "dynamo_after_op": after_forward, "roi": out,
                  "placeholder_answer": placeholder, "real_answer": real.is_compile_supported("cpu"),
                  "real_module": hasattr(real, "counters"), "compiled": torch.compile(lambda t: t * 2 + 1,
                  backend="eager")(torch.ones(2)).tolist()}))
"""


@pytest.fixture(scope="module")
def skipped():
    return _fresh(LOAD_MODEL)


def test_loading_a_model_skips_torchdynamo(skipped):
    assert skipped["dynamo_at_import"] is False and skipped["dynamo_after_op"] is False


def test_torchvision_and_torchdynamo_work_as_usual_afterwards(skipped):
    plain = _fresh(LOAD_MODEL, FPN_IMPORT_DYNAMO="1")  # the hook off: torchvision's own import
    assert plain["dynamo_at_import"] is True
    assert skipped["roi"] == plain["roi"]
    assert skipped["placeholder_answer"] == skipped["real_answer"] == plain["real_answer"]
    assert skipped["real_module"] and skipped["compiled"] == [3.0, 3.0]


def test_placeholder_hands_over_to_the_real_module_for_anything_else():
    got = _fresh("""
import json, sys
import torch
from fpn_model._imports import _UTILS, _placeholder
p = _placeholder()
sys.modules[_UTILS] = p
from torch._dynamo.utils import counters  # a name torchvision does not ask for today
print(json.dumps({"counters": type(counters).__name__, "placeholder_gone": sys.modules[_UTILS] is not p}))
""")
    assert got == {"counters": "defaultdict", "placeholder_gone": True}


def test_planning_code_and_the_drivers_commands_stay_torch_free():
    """The driver of `fpn run` and `fpn demo` never needs torch (the detectors import it in their processes):
    importing it there cost the demo 2-4 s and 590 MiB before Ray started (benchmarks/README)."""
    got = _fresh("import json, sys; import fpn_model.weights, pipeline.plan, jobs.runner, jobs.cli, jobs.demo; "
                 "print(json.dumps({'torch': 'torch' in sys.modules}))")
    assert got == {"torch": False}
