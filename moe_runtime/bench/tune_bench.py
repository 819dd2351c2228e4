"""``bench tune``: step time, peak memory, trainable parameters and adapter bytes per method.

Each method trains in its own process (so its peak RSS is its own), on the same data, batch and
steps; step time is the median over the steps after warm-up, measured by a Trainer callback.
``routed_lora`` is the default variant, perft-r (4 LoRA experts of rank 8 per MoE layer, top-2).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .memory import peak_rss_bytes

__all__ = ["bench_tune", "METHODS"]

METHODS = ("full", "lora", "esft", "routed_lora")


def _worker(
    method: str, model_arg: str, data: Path, experts: Path, out: Path, steps: int, batch: int
) -> dict:
    """Runs inside the child process: train one method, report measurements as a dict."""
    import torch
    from transformers import Trainer, TrainerCallback

    from ..data import read_examples
    from ..models import find_moe_layers, load_model, load_tokenizer, pad_token_id
    from ..tuning.data import encode_examples
    from ..tuning.registry import TuneJob
    from ..tuning.trainer import TrainConfig

    torch.set_num_threads(int(os.environ.get("MOE_BENCH_THREADS", "2")))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Clock())

    Trainer.__init__ = init
    model = load_model(model_arg, dtype="float32")
    tokenizer = load_tokenizer(model_arg)
    info = find_moe_layers(model)
    rss_loaded = psutil.Process().memory_info().rss
    features = encode_examples(tokenizer, read_examples(data), 256)
    config = TrainConfig(steps=steps, lr=1e-4, batch_size=batch, seed=0)
    job = TuneJob(model, info, features, config, out=out, pad_id=pad_token_id(tokenizer), progress=False)
    job.work_dir = out.with_suffix(".work")
    if method == "esft":
        from ..tuning.esft import read_expert_config, tune_esft

        summary = tune_esft(job, read_expert_config(experts))
    elif method == "routed_lora":
        from ..tuning.routed_lora import RoutedLoraSettings, tune_routed_lora

        summary = tune_routed_lora(job, RoutedLoraSettings())
    elif method == "full":
        from ..tuning.full import tune_full

        summary = tune_full(job)
    else:
        from ..tuning.lora import tune_lora

        summary = tune_lora(job)
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    warm = times[2:] if len(times) > 4 else times
    return {
        "step_time_s": statistics.median(warm),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_load_bytes": rss_loaded,
        "trainable_params": summary["trainable_params"],
        "adapter_bytes": sum(p.stat().st_size for p in files),
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "steps": len(times),
    }


def bench_tune(model_arg: str, data: Path, experts: Path, *, steps: int = 20, batch: int = 16) -> dict:
    """Train each method in a fresh process and collect its measurements.

    Args:
        model_arg: ``demo`` or a checkpoint directory.
        data: training JSONL.
        experts: expert_cfg.json for ESFT.
        steps: optimizer steps per method (the first two are warm-up).
        batch: global batch size.
    """
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            out = Path(tmp) / method
            cmd = [
                sys.executable,
                "-m",
                "moe_runtime.bench.tune_bench",
                method,
                model_arg,
                str(data),
                str(experts),
                str(out),
            ]
            cmd += [str(steps), str(batch)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            )
            if proc.returncode != 0:
                raise RuntimeError(f"bench tune: {method} failed:\n{proc.stderr[-2000:]}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = results["full"]
    model_bytes = full["model_bytes"]
    for row in results.values():
        row["step_time_vs_full"] = row["step_time_s"] / full["step_time_s"]
        row["peak_rss_vs_full"] = row["peak_rss_bytes"] / full["peak_rss_bytes"]
        row["training_memory_vs_full"] = (row["peak_rss_bytes"] - row["rss_after_load_bytes"]) / max(
            1, full["peak_rss_bytes"] - full["rss_after_load_bytes"]
        )
        row["adapter_fraction_of_model"] = row["adapter_bytes"] / model_bytes
    return {"steps": steps, "batch_size": batch, **results}


if __name__ == "__main__":  # the per-method child process
    method, model_arg, data, experts, out, steps, batch = sys.argv[1:8]
    result = _worker(method, model_arg, Path(data), Path(experts), Path(out), int(steps), int(batch))
    print(json.dumps(result))
