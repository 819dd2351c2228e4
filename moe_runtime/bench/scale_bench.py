"""``bench scale``: serving a checkpoint of a real model's shape with its experts on disk.

    checkpoint   written by moe_runtime.testing.shapes (the real config, bf16, the hub's per-expert
                 layout) into the work directory, unless one is given; free disk checked first
    plan         what the budget implies (config + headers only, the same as generate --plan)
    bandwidth    cold sequential read of the checkpoint's shards (up to 2 GB) through the loader
    offload      --offload disk at the budget, compute dtype auto (float32 on the CPU), cold page
                 cache, requests one at a time; per forward: bytes read, stall, time, split into
                 prefill (the prompt's forward) and decode (one token per forward)
    [pack]       with pack: build the packed copy (its time and disk bytes), then the offload run
                 again served from it (``tokens_per_s_packed``)
    [resident]   the same requests with every weight in RAM (if twice its weights fit in 80% of the
                 available memory: loading peaks at about twice), with the offload run's compute
                 threads: tokens must be equal; its decode time is the compute time of the bound
    [accelerate] transformers + accelerate disk offload with the same RAM (max_memory)
    bound        decode tokens / (compute time + decode bytes read / cold bandwidth) (reads and compute
                 one after the other; prefetch overlapping them can beat it: ``bound_fraction`` > 1),
                 and ``bound_tokens_per_s_overlapped`` = decode tokens / max(compute, reads);
                 compute time = the resident run's decode time, else the offload run's decode time
                 minus its stalls (``compute_source`` says which); ``bound_fraction`` = tokens_per_s / bound

Each run is a child process (clean peak RSS); the page cache of the checkpoint is dropped before
each (``posix_fadvise DONTNEED``). A checkpoint the bench wrote is deleted at the end unless ``keep``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .memory import peak_rss_bytes, run_child
from .offload_bench import drop_page_cache

__all__ = ["ScaleBenchSettings", "bench_scale"]

_BANDWIDTH_BYTES = 2 * 10**9
_CHUNK = 16 << 20


@dataclass
class ScaleBenchSettings:
    """Shape, workload and offload settings of the benchmark."""

    shape: str = "deepseek-v2-lite"
    layers: int | None = None
    budget: str = "25%"
    prompts: int = 2
    prompt_len: int = 10
    new_tokens: int = 4
    seed: int = 0
    pack: bool = False
    accelerate: bool = True
    resident: bool = True
    compute_dtype: str = "auto"
    prefetch: tuple[str, ...] = ("router",)
    widths: dict | None = None  # test-only width overrides (moe_runtime.testing.shapes.TINY_WIDTHS)


def _prompts(settings: ScaleBenchSettings, vocab: int) -> list[list[int]]:
    rng = random.Random(settings.seed)
    return [[rng.randrange(3, vocab) for _ in range(settings.prompt_len)] for _ in range(settings.prompts)]


def _offload_config(settings: ScaleBenchSettings, cache_dir: str):
    from ..runtime.offload import OffloadConfig

    return OffloadConfig(
        budget=settings.budget, prefetch=tuple(settings.prefetch), cache_dir=cache_dir, pack=settings.pack
    )


def _vocab(ckpt: Path) -> int:
    return int(json.loads((ckpt / "config.json").read_text())["vocab_size"])


# child processes ---------------------------------------------------------------------------


def _measured_generate(engine, settings: ScaleBenchSettings, ckpt: Path) -> dict:
    """Generate request by request; per forward: seconds, bytes read and stall, prefill vs decode."""
    import torch

    from ..runtime import DecodeConfig, Request

    stats = engine.offload.stats if engine.offload is not None else None
    phases = {"prefill": [0.0, 0, 0.0, 0], "decode": [0.0, 0, 0.0, 0]}  # seconds, bytes, stall, forwards
    mark: list = []

    def before(module, args, kwargs):
        mark[:] = [time.perf_counter(), stats.bytes_read if stats else 0, stats.stall_s if stats else 0.0]

    def after(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        phase = phases["prefill" if ids is not None and ids.shape[-1] > 1 else "decode"]
        phase[0] += time.perf_counter() - mark[0]
        phase[1] += (stats.bytes_read if stats else 0) - mark[1]
        phase[2] += (stats.stall_s if stats else 0.0) - mark[2]
        phase[3] += 1

    hooks = [
        engine.model.register_forward_pre_hook(before, with_kwargs=True),
        engine.model.register_forward_hook(after, with_kwargs=True),
    ]
    config = DecodeConfig(max_new_tokens=settings.new_tokens, max_batch_size=1, stop_on_eos=False)
    tokens, start = [], time.perf_counter()
    with torch.no_grad():
        for i, prompt in enumerate(_prompts(settings, _vocab(ckpt))):
            tokens.append(engine.generate([Request(prompt=prompt, id=i)], config)[0].token_ids)
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    out = {"tokens": tokens, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}
    for name, (secs, nbytes, stall, forwards) in phases.items():
        out.update(
            {
                f"{name}_s": secs,
                f"{name}_bytes_read": nbytes,
                f"{name}_stall_s": stall,
                f"{name}_forwards": forwards,
            }
        )
    return out


def _child_offload(ckpt: Path, settings: ScaleBenchSettings, cache_dir: str) -> dict:
    import torch

    from ..runtime import MultiAdapterEngine

    engine = MultiAdapterEngine.from_pretrained(
        ckpt, dtype=settings.compute_dtype, offload=_offload_config(settings, cache_dir)
    )
    drop_page_cache([ckpt] + ([engine.offload.store.packed_path] if engine.offload.store.packed_path else []))
    result = _measured_generate(engine, settings, ckpt)
    tier = engine.offload
    return {
        **result,
        "stats": tier.stats.to_json(),
        "slots_per_layer": tier.num_slots,
        "resident_expert_bytes": tier.resident_expert_bytes(),
        "store": tier.store.kind,
        "compute_dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        "compute_threads": torch.get_num_threads(),
    }


def _child_resident(ckpt: Path, settings: ScaleBenchSettings, cache_dir: str) -> dict:
    import torch

    from ..runtime import MultiAdapterEngine

    torch.set_num_threads(int(os.environ["MOE_BENCH_THREADS"]))  # the offload run's compute threads
    engine = MultiAdapterEngine.from_pretrained(ckpt, dtype=settings.compute_dtype)
    return _measured_generate(engine, settings, ckpt)


def _child_pack(ckpt: Path, settings: ScaleBenchSettings, cache_dir: str) -> dict:
    from ..runtime.offload import load_offloaded_model

    start = time.perf_counter()
    _, _, store = load_offloaded_model(ckpt, cache_dir=cache_dir, pack=True)
    return {
        "seconds": time.perf_counter() - start,
        "disk_bytes": store.packed_path.stat().st_size,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _child_accelerate(ckpt: Path, settings: ScaleBenchSettings, cache_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ram = int(os.environ["MOE_BENCH_RAM"])
    with tempfile.TemporaryDirectory(dir=cache_dir) as folder:
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, device_map="auto", max_memory={"cpu": ram}, offload_folder=folder
        )
        drop_page_cache([Path(ckpt), Path(folder)])
        tokens, start = [], time.perf_counter()
        with torch.no_grad():
            for prompt in _prompts(settings, _vocab(ckpt)):
                ids = torch.tensor([prompt])
                out = model.generate(
                    ids,
                    max_new_tokens=settings.new_tokens,
                    min_new_tokens=settings.new_tokens,
                    do_sample=False,
                )
                tokens.append(out[0, ids.shape[1] :].tolist())
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}


_CHILDREN = {
    "offload": _child_offload,
    "resident": _child_resident,
    "pack": _child_pack,
    "accelerate": _child_accelerate,
}


def _run_child(
    mode: str, ckpt: Path, settings: ScaleBenchSettings, cache_dir: Path, env: dict | None = None
) -> dict:
    return run_child("moe_runtime.bench.scale_bench", "scale", mode, ckpt, settings, cache_dir, env)


def _cold_bandwidth(ckpt: Path) -> dict:
    """Sequential reads of the shards (up to 2 GB) through the loader, page cache dropped first."""
    import torch

    from ..models.checkpoint_files import safetensors_files
    from ..ops.loader import ExpertLoader

    files = safetensors_files(ckpt)
    drop_page_cache(files)
    buffers = [torch.empty(_CHUNK, dtype=torch.uint8) for _ in range(4)]
    total, start = 0, time.perf_counter()
    with ExpertLoader(2) as loader:
        pending = []
        for file in files:
            size = file.stat().st_size
            for offset in range(0, size, _CHUNK):
                if total >= _BANDWIDTH_BYTES:
                    break
                nbytes = min(_CHUNK, size - offset)
                if len(pending) == len(buffers):
                    loader.wait(pending.pop(0))
                buffer = buffers[(total // _CHUNK) % len(buffers)]
                pending.append(loader.submit(file, [(offset, nbytes)], buffer, 0))
                total += nbytes
        for ticket in pending:
            loader.wait(ticket)
    seconds = time.perf_counter() - start
    drop_page_cache(files)
    return {"bytes": total, "seconds": seconds, "bandwidth_bytes_per_s": total / seconds}


def bench_scale(
    settings: ScaleBenchSettings,
    *,
    workdir: str | Path,
    checkpoint: str | Path | None = None,
    keep: bool = False,
) -> dict:
    """Run the benchmark (see the module docstring); returns its JSON fields."""
    import psutil

    from ..runtime.offload.plan import plan_memory
    from ..testing.shapes import shape_config, write_checkpoint

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    wrote, write_s = False, None
    if checkpoint is None:
        config = shape_config(settings.shape, layers=settings.layers, **(settings.widths or {}))
        ckpt = work / f"{settings.shape}-{config['num_hidden_layers']}l"
        if not (ckpt / "config.json").exists():
            start = time.perf_counter()
            write_checkpoint(config, ckpt, seed=settings.seed, progress=True)
            write_s, wrote = time.perf_counter() - start, not keep
    else:
        ckpt = Path(checkpoint)
    cache = work / "cache"
    cache.mkdir(exist_ok=True)
    try:
        layers = int(json.loads((ckpt / "config.json").read_text())["num_hidden_layers"])
        plan = plan_memory(ckpt, _offload_config(settings, str(cache)), settings.compute_dtype)
        bandwidth = _cold_bandwidth(ckpt)
        offload = _run_child("offload", ckpt, dataclasses.replace(settings, pack=False), cache)
        pack = packed = None
        if settings.pack:  # the opt-in packed copy: its cost, and the same run served from it
            pack = _run_child("pack", ckpt, settings, cache)
            packed = _run_child("offload", ckpt, settings, cache)
        # loading widens bf16 to float32 through a second copy: the peak is about twice the weights
        resident_ram = plan["non_expert_bytes"] + plan["routed_expert_bytes"]
        resident = None
        if settings.resident and 2 * resident_ram < 0.8 * psutil.virtual_memory().available:
            threads = {"MOE_BENCH_THREADS": str(offload["compute_threads"])}
            resident = _run_child("resident", ckpt, settings, cache, threads)
        accelerate = None
        if settings.accelerate:
            env = {"MOE_BENCH_RAM": str(plan["ram_bytes"])}
            accelerate = _run_child("accelerate", ckpt, settings, cache, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if wrote:
            shutil.rmtree(ckpt, ignore_errors=True)
    decode_tokens = offload["decode_forwards"]
    tokens_per_s = decode_tokens / offload["decode_s"] if offload["decode_s"] else 0.0
    if resident is not None:
        compute_s, source = resident["decode_s"], "resident run"
    else:
        compute_s, source = offload["decode_s"] - offload["decode_stall_s"], "offload run minus its stalls"
    read_s = offload["decode_bytes_read"] / bandwidth["bandwidth_bytes_per_s"]
    bound = decode_tokens / (compute_s + read_s) if compute_s + read_s > 0 else 0.0
    overlapped = decode_tokens / max(compute_s, read_s) if max(compute_s, read_s) > 0 else 0.0
    total_new = sum(len(t) for t in offload["tokens"])
    result = {
        "shape": settings.shape,
        "layers": layers,
        "checkpoint": str(ckpt) if not wrote else f"{ckpt} (written, {write_s:.0f} s, deleted)",
        "checkpoint_bytes": plan["checkpoint_bytes"],
        "compute_dtype": offload["compute_dtype"],
        "budget": settings.budget,
        "budget_bytes": offload["resident_expert_bytes"],
        "slots_per_layer": offload["slots_per_layer"],
        "non_expert_bytes": plan["non_expert_bytes"],
        "peak_rss_bytes": offload["peak_rss_bytes"],
        "peak_rss_limit_bytes": plan["non_expert_bytes"] + offload["resident_expert_bytes"] + int(1.5e9),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_end_to_end": total_new / offload["seconds"],
        "bound_tokens_per_s": bound,
        "bound_fraction": tokens_per_s / bound if bound else 0.0,
        "bound_tokens_per_s_overlapped": overlapped,
        "bound_fraction_overlapped": tokens_per_s / overlapped if overlapped else 0.0,
        "compute_source": source,
        "compute_s_offload": offload["decode_s"] - offload["decode_stall_s"],
        "cold_bandwidth_bytes_per_s": bandwidth["bandwidth_bytes_per_s"],
        "prefill_bytes_read": offload["prefill_bytes_read"],
        "decode_bytes_read": offload["decode_bytes_read"],
        "bytes_read_per_decode_token": offload["decode_bytes_read"] / max(decode_tokens, 1),
        "prefill_s": offload["prefill_s"],
        "prefill_stall_s": offload["prefill_stall_s"],
        "decode_s": offload["decode_s"],
        "decode_stall_s": offload["decode_stall_s"],
        "hit_rate": offload["stats"]["hit_rate"],
        "store": offload["store"],
        "plan": plan,
        "tokens_per_s_resident": (
            resident["decode_forwards"] / resident["decode_s"] if resident and resident["decode_s"] else None
        ),
        "peak_rss_bytes_resident": resident["peak_rss_bytes"] if resident else None,
        "tokens_equal_resident": (resident["tokens"] == offload["tokens"]) if resident else None,
        "tokens_per_s_accelerate": total_new / accelerate["seconds"] if accelerate else None,
        "peak_rss_bytes_accelerate": accelerate["peak_rss_bytes"] if accelerate else None,
        "speedup_vs_accelerate_end_to_end": (accelerate["seconds"] / offload["seconds"])
        if accelerate
        else None,
        "pack_build_s": pack["seconds"] if pack else None,
        "pack_disk_bytes": pack["disk_bytes"] if pack else None,
        "tokens_per_s_packed": (packed["decode_forwards"] / packed["decode_s"]) if packed else None,
        "tokens_equal_packed": (packed["tokens"] == offload["tokens"]) if packed else None,
        "workload": {
            "prompts": settings.prompts,
            "prompt_len": settings.prompt_len,
            "new_tokens": settings.new_tokens,
        },
    }
    return result


def _main(argv: list[str]) -> None:
    mode, ckpt, settings_json, cache_dir, out = argv
    fields = json.loads(settings_json)
    fields["prefetch"] = tuple(fields["prefetch"])
    settings = ScaleBenchSettings(**fields)
    result = _CHILDREN[mode](Path(ckpt), settings, cache_dir)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
