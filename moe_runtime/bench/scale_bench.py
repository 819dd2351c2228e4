"""``bench scale``: serving a checkpoint of a real model's shape with its experts on disk.

    checkpoint   written by moe_runtime.testing.shapes (the real config, bf16, the hub's per-expert
                 layout) into the work directory, unless one is given; free disk checked first
    plan         what the budget implies (config + headers only, the same as generate --plan)
    bandwidth    cold sequential read of the checkpoint's shards (``bandwidth_bytes``, 4 GB), page cache
                 dropped before each read: through the loader (its reader threads, 16 MiB requests) and
                 dd-like (one thread, 16 MiB ``readinto``), before and after the offload run (the disk
                 may be shared); the bound takes the fastest of the four
    offload      --offload disk at the budget, compute dtype auto (float32 on the CPU), cold page
                 cache, requests one at a time; per forward: bytes read, stall, time, split into
                 prefill (the prompt's forward) and decode (one token per forward)
    [pack]       with pack: build the packed copy (its time and disk bytes), then the offload run
                 again served from it (``tokens_per_s_packed``)
    [resident]   the same requests with every weight in RAM (if its weights fit: see ``_fits``), with
                 the offload run's compute threads: tokens must be equal; its decode time is the
                 compute time of the bound
    [compute fit] otherwise (the model does not fit): the same requests, resident, on reduced-layer
                 copies of the same shape (``compute_layers``, e.g. 2 and 4 layers, same widths) ->
                 median decode seconds per token at each -> a line in the layer count, read at the
                 checkpoint's layer count (cached in the work directory for later runs and series)
    [accelerate] transformers + accelerate disk offload with the same RAM (max_memory), if its float32
                 offload folder fits the free disk; stopped (and reported as such) past ``rss_limit``
                 or ``accelerate_timeout_s``
    bound        decode tokens / (compute time + decode bytes read / cold bandwidth) (reads and compute
                 one after the other; prefetch overlapping them can beat it: ``bound_fraction`` > 1),
                 and ``bound_tokens_per_s_overlapped`` = decode tokens / max(compute, reads);
                 compute time = the resident run's decode time, else the compute fit, else the
                 offload run's decode time minus its stalls (``compute_source`` says which);
                 ``bound_fraction`` = tokens_per_s / bound (target >= 0.70)

Each run is a child process (clean peak RSS); the page cache of the checkpoint is dropped before
each (``posix_fadvise DONTNEED``). A checkpoint the bench wrote is deleted at the end unless ``keep``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .memory import peak_rss_bytes, run_child
from .offload_bench import drop_page_cache, hf_greedy_timed
from .scale_bound import cold_bandwidth, compute_fit, fits_resident

__all__ = ["ScaleBenchSettings", "bench_scale", "check_shape"]

_ACCELERATE_DISK_MARGIN = 10**9
# config fields a checkpoint may differ in from its shape and still be "the same widths"
_FREE_FIELDS = {"num_hidden_layers", "max_window_layers", "torch_dtype", "dtype", "transformers_version"}


@dataclass
class ScaleBenchSettings:
    """Shape, workload and offload settings of the benchmark.

    Attributes:
        compute_layers: layer counts of the reduced copies timed resident for the compute fit.
        compute_from: "auto" (the checkpoint itself if it fits resident, else the reduced copies),
            "resident" or "reduced".
        bandwidth_bytes: bytes read by each cold sequential read measure.
        rss_limit: the accelerate baseline is stopped past this RSS; the resident runs must fit it.
        accelerate_timeout_s: the accelerate baseline is stopped after this long.
    """

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
    compute_layers: tuple[int, ...] = (2, 4)
    compute_from: str = "auto"
    bandwidth_bytes: int = 4 * 10**9
    rss_limit: int = 12 * 10**9
    accelerate_timeout_s: float = 1800.0
    widths: dict | None = None  # test-only width overrides (moe_runtime.testing.shapes.TINY_WIDTHS)

    @classmethod
    def from_json(cls, fields: dict) -> ScaleBenchSettings:
        fields = dict(fields)
        for name in ("prefetch", "compute_layers"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


def _prompts(settings: ScaleBenchSettings, vocab: int) -> list[list[int]]:
    rng = random.Random(settings.seed)
    return [[rng.randrange(3, vocab) for _ in range(settings.prompt_len)] for _ in range(settings.prompts)]


def _offload_config(settings: ScaleBenchSettings, cache_dir: str):
    from ..runtime.offload import OffloadConfig

    return OffloadConfig(
        budget=settings.budget, prefetch=tuple(settings.prefetch), cache_dir=cache_dir, pack=settings.pack
    )


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _vocab(ckpt: Path) -> int:
    return int(_config(ckpt)["vocab_size"])


def check_shape(ckpt: Path, settings: ScaleBenchSettings) -> int:
    """The checkpoint's layer count, after checking its config is ``settings.shape`` (widths included).

    Raises:
        UsageError: no config.json, or a field of the shape's config differs.
    """
    from ..testing.shapes import shape_config

    if not (ckpt / "config.json").is_file():
        raise UsageError(f"--checkpoint {ckpt}: no config.json there (not a checkpoint directory)")
    config = _config(ckpt)
    for key, value in shape_config(settings.shape, **(settings.widths or {})).items():
        if isinstance(value, dict) or key in _FREE_FIELDS:  # nested: transformers fills them in
            continue
        if key in config and config[key] != value:
            raise UsageError(
                f"--checkpoint {ckpt}: config.json has {key}={config[key]!r}, the {settings.shape} shape "
                f"has {value!r} (give the matching --shape)"
            )
    return int(config["num_hidden_layers"])


# child processes ---------------------------------------------------------------------------


def _measured_generate(engine, settings: ScaleBenchSettings, ckpt: Path) -> dict:
    """Generate request by request; per forward: seconds, bytes read and stall, prefill vs decode.

    The split snapshots the store's counters around every forward of the model: a forward over
    more than one position is the prompt's (prefill), one position is a decoded token.
    """
    import torch

    from ..runtime import DecodeConfig, Request

    stats = engine.offload.stats if engine.offload is not None else None
    phases = {"prefill": [0.0, 0, 0.0, 0], "decode": [0.0, 0, 0.0, 0]}  # seconds, bytes, stall, forwards
    decode_times: list[float] = []
    mark: list = []

    counted = ("misses", "prefetches", "prefetch_hits")
    counts = {name: dict.fromkeys(counted, 0) for name in phases}

    def before(module, args, kwargs):
        mark[:] = [time.perf_counter(), stats.bytes_read if stats else 0, stats.stall_s if stats else 0.0]
        mark.append([getattr(stats, c) if stats else 0 for c in counted])

    def after(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        name = "prefill" if ids is not None and ids.shape[-1] > 1 else "decode"
        phase, seconds = phases[name], time.perf_counter() - mark[0]
        phase[0] += seconds
        phase[1] += (stats.bytes_read if stats else 0) - mark[1]
        phase[2] += (stats.stall_s if stats else 0.0) - mark[2]
        phase[3] += 1
        for counter, start in zip(counted, mark[3]):
            counts[name][counter] += (getattr(stats, counter) if stats else 0) - start
        if name == "decode":
            decode_times.append(seconds)

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
    out = {
        "tokens": tokens,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "decode_forward_s": decode_times,
    }
    for name, (secs, nbytes, stall, forwards) in phases.items():
        out.update(
            {
                f"{name}_s": secs,
                f"{name}_bytes_read": nbytes,
                f"{name}_stall_s": stall,
                f"{name}_forwards": forwards,
                **{f"{name}_{counter}": value for counter, value in counts[name].items()},
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
        "compute_threads": tier.compute_threads or torch.get_num_threads(),
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
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, device_map="auto", max_memory={"cpu": ram}, offload_folder=folder
        )
        load_s = time.perf_counter() - start
        folder_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        drop_page_cache([Path(ckpt), Path(folder)])
        tokens, seconds = hf_greedy_timed(model, _prompts(settings, _vocab(ckpt)), settings.new_tokens)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "load_s": load_s,
        "offload_folder_bytes": folder_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
    }


_CHILDREN = {
    "offload": _child_offload,
    "resident": _child_resident,
    "pack": _child_pack,
    "accelerate": _child_accelerate,
}


def _child_args(mode: str, ckpt: Path, settings: ScaleBenchSettings, cache_dir: Path, out: Path) -> list[str]:
    settings_json = json.dumps(dataclasses.asdict(settings))
    return [sys.executable, "-m", "moe_runtime.bench.scale_bench", mode, str(ckpt), settings_json,
            str(cache_dir), str(out)]  # fmt: skip


def _run_child(
    mode: str, ckpt: Path, settings: ScaleBenchSettings, cache_dir: Path, env: dict | None = None
) -> dict:
    return run_child("moe_runtime.bench.scale_bench", "scale", mode, ckpt, settings, cache_dir, env)


def _tree_rss(proc) -> int:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
    except psutil.Error:
        return 0


def _run_watched(mode: str, ckpt: Path, settings: ScaleBenchSettings, cache_dir: Path, env: dict) -> dict:
    """A child run stopped past ``settings.rss_limit`` or ``accelerate_timeout_s``.

    Returns:
        The child's JSON, or ``{"not_run": reason}`` when it was stopped or failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr"
        with open(err, "w") as stderr:
            proc = subprocess.Popen(
                _child_args(mode, ckpt, settings, cache_dir, out),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **env},
            )
        start, peak, reason = time.perf_counter(), 0, None
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc))
            elapsed = time.perf_counter() - start
            if peak > settings.rss_limit:
                reason = f"stopped at {peak / 1e9:.1f} GB RSS (limit {settings.rss_limit / 1e9:.1f} GB) after {elapsed:.0f} s"
            elif elapsed > settings.accelerate_timeout_s:
                reason = f"stopped after {elapsed:.0f} s (limit {settings.accelerate_timeout_s:.0f} s)"
            if reason:
                proc.kill()
                proc.wait()
                return {"not_run": reason}
            time.sleep(0.25)
        if proc.returncode != 0:
            lines = [x for x in err.read_text().splitlines() if x.strip()]
            return {"not_run": f"failed (exit {proc.returncode}): {lines[-1] if lines else 'no message'}"}
        return json.loads(out.read_text())


# the bench ---------------------------------------------------------------------------------


def _accelerate(ckpt: Path, settings: ScaleBenchSettings, cache: Path, plan: dict) -> dict:
    """The accelerate baseline, or ``{"not_run": reason}`` where its offload folder cannot fit the disk."""
    need = plan["routed_expert_bytes"] + _ACCELERATE_DISK_MARGIN  # experts resaved in float32
    free = shutil.disk_usage(cache).free
    if need > free:
        return {
            "not_run": f"its float32 offload folder needs about {need / 1e9:.1f} GB of disk, "
            f"{free / 1e9:.1f} GB free"
        }
    return _run_watched("accelerate", ckpt, settings, cache, {"MOE_BENCH_RAM": str(plan["ram_bytes"])})


def bench_scale(
    settings: ScaleBenchSettings,
    *,
    workdir: str | Path,
    checkpoint: str | Path | None = None,
    keep: bool = False,
) -> dict:
    """Run the benchmark (see the module docstring); returns its JSON fields.

    Raises:
        UsageError: a checkpoint of another shape, a missing or truncated shard, a budget below
            top-k, or not enough disk to write the checkpoint.
    """
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
        layers = check_shape(ckpt, settings)
        plan = plan_memory(ckpt, _offload_config(settings, str(cache)), settings.compute_dtype)
        before = cold_bandwidth(ckpt, settings.bandwidth_bytes)
        offload = _run_child("offload", ckpt, dataclasses.replace(settings, pack=False), cache)
        after = cold_bandwidth(ckpt, settings.bandwidth_bytes)  # the disk is shared: measured twice
        fastest = max(before["bandwidth_bytes_per_s"], after["bandwidth_bytes_per_s"])
        bandwidth = {"before": before, "after": after, "bandwidth_bytes_per_s": fastest}
        threads = offload["compute_threads"]
        pack = packed = None
        if settings.pack:  # the opt-in packed copy: its cost, and the same run served from it
            pack = _run_child("pack", ckpt, settings, cache)
            packed = _run_child("offload", ckpt, settings, cache)
        resident = fit = None
        whole = plan["non_expert_bytes"] + plan["routed_expert_bytes"]
        use_resident = settings.compute_from == "resident" or (
            settings.compute_from == "auto" and fits_resident(whole, settings)
        )
        if settings.resident and use_resident:
            resident = _run_child("resident", ckpt, settings, cache, {"MOE_BENCH_THREADS": str(threads)})
        elif settings.resident:
            env = {"MOE_BENCH_THREADS": str(threads)}
            fit = compute_fit(
                settings, work, threads, lambda c: _run_child("resident", c, settings, cache, env), keep=keep
            )
        accelerate = _accelerate(ckpt, settings, cache, plan) if settings.accelerate else None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if wrote:
            shutil.rmtree(ckpt, ignore_errors=True)
    return _result(settings, ckpt, layers, wrote, write_s, plan, bandwidth, offload, pack, packed,
                   resident, fit, accelerate)  # fmt: skip


def _result(settings, ckpt, layers, wrote, write_s, plan, bandwidth, offload, pack, packed, resident, fit,
            accelerate) -> dict:  # fmt: skip
    decode_tokens = offload["decode_forwards"]
    tokens_per_s = decode_tokens / offload["decode_s"] if offload["decode_s"] else 0.0
    if resident is not None:
        compute_s, source = resident["decode_s"], "resident run"
    elif fit is not None:
        per_token = fit["intercept_s"] + fit["per_layer_s"] * layers
        compute_s = per_token * decode_tokens
        points = ", ".join(f"{n} layers {s * 1e3:.0f} ms" for n, s in fit["points"])
        source = f"resident reduced copies ({points}; median decode token), line read at {layers} layers"
    else:
        compute_s, source = offload["decode_s"] - offload["decode_stall_s"], "offload run minus its stalls"
    read_s = offload["decode_bytes_read"] / bandwidth["bandwidth_bytes_per_s"]
    bound = decode_tokens / (compute_s + read_s) if compute_s + read_s > 0 else 0.0
    overlapped = decode_tokens / max(compute_s, read_s) if max(compute_s, read_s) > 0 else 0.0
    total_new = sum(len(t) for t in offload["tokens"])
    limit = plan["non_expert_bytes"] + offload["resident_expert_bytes"] + int(1.5e9)
    accelerate_ran = accelerate is not None and "not_run" not in accelerate
    return {
        "shape": settings.shape,
        "layers": layers,
        "checkpoint": str(ckpt) if not wrote else f"{ckpt} (written, {write_s:.0f} s, deleted)",
        "checkpoint_bytes": plan["checkpoint_bytes"],
        "compute_dtype": offload["compute_dtype"],
        "compute_threads": offload["compute_threads"],
        "budget": settings.budget,
        "budget_bytes": offload["resident_expert_bytes"],
        "slots_per_layer": offload["slots_per_layer"],
        "non_expert_bytes": plan["non_expert_bytes"],
        "peak_rss_bytes": offload["peak_rss_bytes"],
        "peak_rss_limit_bytes": limit,
        "peak_rss_within_limit": offload["peak_rss_bytes"] <= limit,
        "tokens_per_s": tokens_per_s,
        "s_per_token": 1 / tokens_per_s if tokens_per_s else None,
        "tokens_per_s_end_to_end": total_new / offload["seconds"],
        "bound_tokens_per_s": bound,
        "bound_fraction": tokens_per_s / bound if bound else 0.0,
        "bound_target_met": bool(bound) and tokens_per_s / bound >= 0.70,
        "bound_tokens_per_s_overlapped": overlapped,
        "bound_fraction_overlapped": tokens_per_s / overlapped if overlapped else 0.0,
        "compute_source": source,
        "compute_s_per_token": compute_s / decode_tokens if decode_tokens else None,
        "read_s_per_token": read_s / decode_tokens if decode_tokens else None,
        "compute_fit": {k: v for k, v in fit.items() if k != "key"} if fit else None,
        "compute_s_offload": offload["decode_s"] - offload["decode_stall_s"],
        "cold_bandwidth_bytes_per_s": bandwidth["bandwidth_bytes_per_s"],
        "cold_bandwidth": bandwidth,
        "prefill_bytes_read": offload["prefill_bytes_read"],
        "prefill_tokens": settings.prompts * settings.prompt_len,
        "decode_bytes_read": offload["decode_bytes_read"],
        "decode_tokens": decode_tokens,
        "bytes_read_per_decode_token": offload["decode_bytes_read"] / max(decode_tokens, 1),
        "prefill_s": offload["prefill_s"],
        "prefill_stall_s": offload["prefill_stall_s"],
        "decode_s": offload["decode_s"],
        "decode_stall_s": offload["decode_stall_s"],
        "hit_rate": offload["stats"]["hit_rate"],
        "offload_stats": offload["stats"],
        "decode_misses": offload["decode_misses"],
        "decode_prefetches": offload["decode_prefetches"],
        "decode_prefetch_hits": offload["decode_prefetch_hits"],
        "store": offload["store"],
        "plan": plan,
        "tokens_per_s_resident": (
            resident["decode_forwards"] / resident["decode_s"] if resident and resident["decode_s"] else None
        ),
        "peak_rss_bytes_resident": resident["peak_rss_bytes"] if resident else None,
        "tokens_equal_resident": (resident["tokens"] == offload["tokens"]) if resident else None,
        "tokens_per_s_accelerate": total_new / accelerate["seconds"] if accelerate_ran else None,
        "peak_rss_bytes_accelerate": accelerate["peak_rss_bytes"] if accelerate_ran else None,
        "accelerate_load_s": accelerate["load_s"] if accelerate_ran else None,
        "accelerate_offload_folder_bytes": accelerate["offload_folder_bytes"] if accelerate_ran else None,
        "tokens_equal_accelerate": (accelerate["tokens"] == offload["tokens"]) if accelerate_ran else None,
        "accelerate_not_run": accelerate["not_run"] if accelerate and not accelerate_ran else None,
        "speedup_vs_accelerate_end_to_end": (accelerate["seconds"] / offload["seconds"])
        if accelerate_ran
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
        "settings": dataclasses.asdict(settings),
    }


def _main(argv: list[str]) -> None:
    mode, ckpt, settings_json, cache_dir, out = argv
    settings = ScaleBenchSettings.from_json(json.loads(settings_json))
    result = _CHILDREN[mode](Path(ckpt), settings, cache_dir)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
