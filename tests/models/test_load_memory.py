"""A resident load holds the weights once: peak RSS of ``load_model`` stays near the checkpoint's bytes.

Measured in fresh subprocesses (peak RSS is per process). The fixed cost is the peak of a process that
imports torch and transformers and builds the same model on the meta device (code, no weights); the
load may add at most 1.15x the weights' bytes to it (#19). Before the load path read each tensor
once, this checkpoint's load added about 1.8x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_runtime.testing import save_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1.15

SCRIPT = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
weights = 0
if sys.argv[2] == "load":
    from moe_runtime.models import load_model
    model = load_model(sys.argv[1])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
# VmHWM: this process's own peak (ru_maxrss would start from the forking parent's)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak": int(hwm.split()[1]) * 1024, "weights": weights}))
"""


def _peak(path: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_resident_load_holds_the_weights_once(tmp_path):
    # ~210 MB float32, per-expert tensors in the file (fused into [E, ...] on load)
    path = save_random_checkpoint(
        "mixtral",
        tmp_path / "ckpt",
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_experts=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
    )
    checkpoint_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    fixed = _peak(path, "meta")["peak"]
    loaded = _peak(path, "load")
    assert loaded["weights"] > 0.95 * checkpoint_bytes  # the model holds all of it, in float32
    added = loaded["peak"] - fixed
    assert added <= TOLERANCE * loaded["weights"], (
        f"load added {added / 2**20:.0f} MiB to a {fixed / 2**20:.0f} MiB process for "
        f"{loaded['weights'] / 2**20:.0f} MiB of weights ({added / loaded['weights']:.2f}x > {TOLERANCE}x)"
    )
