"""``bench offload``: decoding with experts on disk, against the resident model and accelerate offload.

    checkpoint  a random float32 Mixtral-architecture model whose routed experts dominate its size
                (~480 MB by default), built once into a cache directory
    prepare     packed expert file (if the layout needs one); disk bandwidth: every expert read once, random
                order, through the same loader, from a cold page cache
    (a) resident     the whole model in RAM, same engine                       -> t_resident
    offload          --offload disk at the budget, cold page cache             -> t_offload, hits, bytes
    (b) accelerate   transformers + accelerate: device_map="auto", max_memory = the same RAM
                     (non-expert weights + budget), offload_folder, cold page cache  -> t_accelerate
    bound            t_resident + bytes the offload run read / measured bandwidth (every read is a
                     fast-tier miss, demand or prefetch); ``bound_fraction`` = bound time / t_offload
    hit_rate_lru     per-layer LRU replayed on the routing trace of the offload run (same cache
                     bookkeeping as the runtime), beside the other policies

With ``tier="cpu"`` (every expert in host memory, page-locked on a GPU) the offload run serves from
host memory and ``device`` (``cuda``) is the fast tier: the resident run holds the whole model on the
GPU, accelerate gets the same GPU budget (``max_memory``) with the rest offloaded to the CPU, and the
bandwidth runs measure host-to-device copies (pinned) instead of disk reads; ``peak_gpu_bytes``
reports each run's peak GPU allocation.

Each run is a separate process (clean peak RSS, nothing cached in Python); the page cache is
dropped before each for the files read (``posix_fadvise DONTNEED``, no privilege needed; else
``/proc/sys/vm/drop_caches`` when permitted). Requests are decoded one at a time
(batch 1), greedy, EOS ignored, the same prompts in every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .memory import peak_rss_bytes, run_child

__all__ = ["OffloadBenchSettings", "bench_offload", "drop_page_cache"]


@dataclass
class OffloadBenchSettings:
    """Model size, workload and offload configuration of the benchmark."""

    family: str = "mixtral"
    hidden_size: int = 768
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_experts: int = 16
    top_k: int = 2
    vocab_size: int = 2048
    prompts: int = 4
    prompt_len: int = 16
    new_tokens: int = 16
    budget: str = "25%"
    policy: str = "lru"
    prefetch: tuple[str, ...] = ("router",)
    seed: int = 0
    accelerate: bool = True
    tier: str = "disk"
    device: str = "cpu"
    # compute threads of every child, resident and offloaded alike (None: torch's default in each,
    # and the disk tier's own "auto"); ``bench offload --threads N`` sets it
    threads: int | None = None

    @classmethod
    def smoke(cls) -> OffloadBenchSettings:
        """A seconds-long configuration for tests."""
        return cls(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_experts=8, vocab_size=256,
                   prompts=2, prompt_len=6, new_tokens=4)  # fmt: skip

    def model_overrides(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "num_attention_heads": max(4, self.hidden_size // 64),
            "num_key_value_heads": max(2, self.hidden_size // 256),
            "head_dim": 64 if self.hidden_size >= 256 else 16,
            "max_position_embeddings": 1024,
        }


def _checkpoint(settings: OffloadBenchSettings, cache: Path) -> Path:
    """The benchmark checkpoint, built once per model configuration."""
    from ..io import atomic_dir
    from ..testing.random_models import build_random_model

    spec = json.dumps([settings.family, settings.model_overrides(), settings.seed], sort_keys=True)
    out = cache / f"{settings.family}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if (out / "config.json").exists():
        return out
    import torch

    model = build_random_model(
        settings.family, seed=settings.seed, dtype=torch.float32, **settings.model_overrides()
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return out


def _prompts(settings: OffloadBenchSettings) -> list[list[int]]:
    rng = random.Random(settings.seed)
    return [
        [rng.randrange(3, settings.vocab_size) for _ in range(settings.prompt_len)]
        for _ in range(settings.prompts)
    ]


def drop_page_cache(paths: list[Path]) -> str:
    """Evict ``paths`` (files or directories) from the page cache.

    Per file with ``posix_fadvise(DONTNEED)`` (no privilege needed, nothing else on the machine is
    affected); without it, the whole page cache through ``/proc/sys/vm/drop_caches`` if permitted.

    Returns:
        ``"fadvise"``, ``"drop_caches"``, or ``"none"`` (the cache stays warm).
    """
    os.sync()
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    if files and hasattr(os, "posix_fadvise"):
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        return "none"


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# child processes ---------------------------------------------------------------------------


def _offload_config(settings: OffloadBenchSettings, cache_dir: str, policy: str, prefetch):
    from ..runtime.offload import OffloadConfig

    return OffloadConfig(
        tier=settings.tier,
        budget=settings.budget,
        policy=policy,
        prefetch=tuple(prefetch),
        cache_dir=cache_dir,
        compute_device=settings.device if settings.tier == "cpu" else None,
        compute_threads=settings.threads or "auto",
    )


def _reset_gpu_peak(settings: OffloadBenchSettings) -> None:
    import torch

    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gpu_bytes(settings: OffloadBenchSettings) -> int | None:
    """Peak GPU allocation since :func:`_reset_gpu_peak` (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() if settings.device.startswith("cuda") else None


def _generate(engine, settings: OffloadBenchSettings) -> tuple[list[list[int]], float]:
    from ..runtime import DecodeConfig, Request

    config = DecodeConfig(max_new_tokens=settings.new_tokens, max_batch_size=1, stop_on_eos=False)
    requests = [Request(prompt=p, id=i) for i, p in enumerate(_prompts(settings))]
    start = time.perf_counter()
    completions = engine.generate(requests, config)  # token ids reach the host: the GPU work is done
    return [c.token_ids for c in completions], time.perf_counter() - start


def _child_prepare(ckpt: Path, settings: OffloadBenchSettings, cache_dir: str) -> dict:
    """Build the packed file if needed; report the expert files and the model's byte split."""
    from ..runtime.offload import load_offloaded_model

    net, info, store = load_offloaded_model(ckpt, cache_dir=cache_dir)
    non_expert = sum(p.numel() * p.element_size() for p in net.parameters() if not p.is_meta)
    files = store.files()
    return {
        "expert_files": files,
        "expert_bytes": info.routed_expert_bytes,
        "non_expert_bytes": non_expert,
        "store": store.kind,
    }


def _child_bandwidth(ckpt: Path, settings: OffloadBenchSettings, cache_dir: str) -> dict:
    """Read every expert once, in random order, through the runtime's loader (``cpu`` tier: copy it
    from host memory into a fast-tier slot, as the tier does)."""
    import torch

    from ..ops.loader import ExpertLoader
    from ..runtime.offload import load_offloaded_model

    _, info, store = load_offloaded_model(ckpt, cache_dir=cache_dir)
    jobs = [(layer.index, e) for layer in info.layers for e in range(layer.num_experts)]
    random.Random(settings.seed).shuffle(jobs)
    if settings.tier == "cpu":
        return _copy_bandwidth(info, store, jobs, torch.device(settings.device))
    buffers = {
        name: torch.empty(shape, dtype=store.dtype) for name, shape in store.shapes[jobs[0][0]].items()
    }
    total, start = 0, time.perf_counter()
    with ExpertLoader(2) as loader:
        for layer, expert in jobs:
            reads = [store.submit(loader, layer, expert, name, buffers[name], 0) for name in buffers]
            for read in reads:
                total += read.nbytes
                for ticket in read.tickets:
                    loader.wait(ticket)
                if read.finish is not None:
                    read.finish()
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "bandwidth_bytes_per_s": total / seconds}


def _copy_bandwidth(info, store, jobs: list[tuple[int, int]], device) -> dict:
    """Host-memory (pinned with a GPU) to fast-tier copies of every expert, as the ``cpu`` tier does."""
    import torch

    pin = device.type == "cuda"
    shapes = store.shapes[jobs[0][0]]
    count = max(layer.num_experts for layer in info.layers)
    host = {n: torch.randn((count, *shape)).to(store.dtype) for n, shape in shapes.items()}
    host = {n: t.pin_memory() if pin else t for n, t in host.items()}
    slots = {n: torch.empty(shape, dtype=store.dtype, device=device) for n, shape in shapes.items()}
    total, start = 0, time.perf_counter()
    for _, expert in jobs:
        for name, dest in slots.items():
            dest.copy_(host[name][expert], non_blocking=pin)
            total += dest.numel() * dest.element_size()
    if pin:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "bandwidth_bytes_per_s": total / seconds}


def _child_resident(ckpt: Path, settings: OffloadBenchSettings, cache_dir: str) -> dict:
    import torch

    from ..models import load_model
    from ..runtime import MultiAdapterEngine

    _reset_gpu_peak(settings)
    engine = MultiAdapterEngine(load_model(ckpt).to(settings.device))
    tokens, seconds = _generate(engine, settings)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "peak_gpu_bytes": _peak_gpu_bytes(settings),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_bytes": _rss(),
        "compute_threads": torch.get_num_threads(),
    }


def _child_offload(ckpt: Path, settings: OffloadBenchSettings, cache_dir: str) -> dict:
    import numpy as np
    import torch

    from ..models import state_of
    from ..runtime import MultiAdapterEngine
    from ..runtime.offload import OffloadedExperts, load_offloaded_model
    from ..runtime.offload.host import move_resident
    from ..runtime.offload.simulate import replay_steps

    _reset_gpu_peak(settings)
    net, info, store = load_offloaded_model(ckpt, cache_dir=cache_dir)
    config = _offload_config(settings, cache_dir, settings.policy, settings.prefetch)
    config.validate()
    move_resident(net, config.device())
    engine = MultiAdapterEngine(net, info=info, offload=OffloadedExperts(store, config))
    steps: list[list[np.ndarray]] = []
    first = info.layers[0].index

    def record(layer, hidden, top_k_index, top_k_weights) -> None:
        if layer.index == first:
            steps.append([])
        steps[-1].append(top_k_index.cpu().numpy().copy())

    for layer in info.layers:
        state_of(layer.experts).observers.append(record)
    tokens, seconds = _generate(engine, settings)
    executor = engine.offload
    stats = executor.stats
    simulated = {}
    for policy in ("lru", "lfu", "lru+trajectory", settings.policy):
        replayed = replay_steps(
            steps, info.layer_indices, info.layers[0].num_experts, executor.num_slots, policy
        )
        simulated[policy] = replayed.hit_rate
    return {
        "tokens": tokens,
        "seconds": seconds,
        "peak_gpu_bytes": _peak_gpu_bytes(settings),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_bytes": _rss(),
        "stats": stats.to_json(),
        "compute_threads": torch.get_num_threads(),
        "slots_per_layer": executor.num_slots,
        "resident_expert_bytes": executor.resident_expert_bytes(),
        "offloaded_bytes": executor.offloaded_bytes(),
        "expert_bytes": info.layers[0].expert_bytes,
        "simulated_hit_rates": simulated,
        "steps": len(steps),
    }


def hf_greedy_timed(
    model, prompts: list[list[int]], new_tokens: int, device=None
) -> tuple[list[list[int]], float]:
    """Transformers' own greedy ``generate``, one prompt at a time, exactly ``new_tokens`` each: the
    tokens and the seconds they took (the baselines' decode loop)."""
    import torch

    tokens, start = [], time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            tokens.append(out[0, ids.shape[1] :].tolist())
    return tokens, time.perf_counter() - start


def _child_accelerate(ckpt: Path, settings: OffloadBenchSettings, cache_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    prepared = json.loads(os.environ["MOE_BENCH_PREPARED"])
    share = float(settings.budget.rstrip("%")) / 100
    ram = int(prepared["non_expert_bytes"] + share * prepared["expert_bytes"])
    gpu = settings.device.startswith("cuda")
    # on a GPU the budget is GPU memory and the rest goes to host memory (accelerate's CPU offload)
    max_memory = (
        {0: ram, "cpu": 2 * (prepared["non_expert_bytes"] + prepared["expert_bytes"])}
        if gpu
        else {"cpu": ram}
    )
    _reset_gpu_peak(settings)
    with tempfile.TemporaryDirectory(dir=cache_dir) as folder:
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, device_map="auto", max_memory=max_memory, offload_folder=folder
        )
        devices = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
        drop_page_cache([Path(ckpt), Path(folder)])
        tokens, seconds = hf_greedy_timed(model, _prompts(settings), settings.new_tokens, settings.device)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": _peak_gpu_bytes(settings),
        "ram_budget": ram,
        "devices": devices,
    }


_CHILDREN = {
    "prepare": _child_prepare,
    "bandwidth": _child_bandwidth,
    "resident": _child_resident,
    "offload": _child_offload,
    "accelerate": _child_accelerate,
}


def _run_child(
    mode: str, ckpt: Path, settings: OffloadBenchSettings, cache_dir: Path, env: dict | None = None
) -> dict:
    return run_child("moe_runtime.bench.offload_bench", "offload", mode, ckpt, settings, cache_dir, env)


def bench_offload(
    settings: OffloadBenchSettings | None = None, *, cache_dir: str | Path | None = None
) -> dict:
    """Run the benchmark (see the module docstring); returns the JSON fields of ``bench offload``."""
    from ..runtime.offload.store import default_cache_dir

    settings = settings or OffloadBenchSettings()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(settings, cache)
    prepared = _run_child("prepare", ckpt, settings, cache)
    expert_files = [Path(p) for p in prepared["expert_files"]]
    cold = drop_page_cache([ckpt, *expert_files])
    bandwidth = _run_child("bandwidth", ckpt, settings, cache)
    if settings.tier == "disk":  # the same reads, from the page cache
        warm_bandwidth = _run_child("bandwidth", ckpt, settings, cache)
    else:  # copies from host memory: no page cache involved
        warm_bandwidth = bandwidth
    drop_page_cache([ckpt, *expert_files])
    resident = _run_child("resident", ckpt, settings, cache)
    drop_page_cache([ckpt, *expert_files])
    offload = _run_child("offload", ckpt, settings, cache)
    accelerate = None
    if settings.accelerate:
        drop_page_cache([ckpt, *expert_files])
        accelerate = _run_child(
            "accelerate", ckpt, settings, cache, {"MOE_BENCH_PREPARED": json.dumps(prepared)}
        )

    tokens = sum(len(t) for t in offload["tokens"])
    stats = offload["stats"]
    bound_seconds = resident["seconds"] + stats["bytes_read"] / bandwidth["bandwidth_bytes_per_s"]
    demand_bound = (
        resident["seconds"] + stats["misses"] * offload["expert_bytes"] / bandwidth["bandwidth_bytes_per_s"]
    )
    page_cache_bound = resident["seconds"] + stats["bytes_read"] / warm_bandwidth["bandwidth_bytes_per_s"]
    tps = tokens / offload["seconds"]
    tps_resident = sum(len(t) for t in resident["tokens"]) / resident["seconds"]
    result = {
        "budget": settings.budget,
        "tier": settings.tier,
        "device": settings.device,
        "tokens_per_s": tps,
        "tokens_per_s_resident": tps_resident,
        "tokens_per_s_accelerate": None,
        "speedup_vs_accelerate": None,
        "hit_rate": stats["hit_rate"],
        "hit_rate_lru": offload["simulated_hit_rates"]["lru"],
        "bytes_read_per_token": stats["bytes_read"] / tokens,
        "bound_fraction": bound_seconds / offload["seconds"],
        "bound_fraction_demand_reads_only": demand_bound / offload["seconds"],
        # every byte at page-cache speed: what re-reads of a file that fits in RAM cost here
        "bound_fraction_page_cache": page_cache_bound / offload["seconds"],
        "policy": settings.policy,
        "prefetch": list(settings.prefetch),
        "prefetch_accuracy": stats["prefetch_accuracy"],
        "stall_s": stats["stall_s"],
        "slots_per_layer": offload["slots_per_layer"],
        "simulated_hit_rates": offload["simulated_hit_rates"],
        "tokens_match_resident": offload["tokens"] == resident["tokens"],
        "tokens": tokens,
        # the slow tier's path: disk reads (disk tier) or host-to-fast-tier copies (cpu tier)
        "bandwidth_measures": "disk reads"
        if settings.tier == "disk"
        else f"host-to-{settings.device} copies",
        "disk_bandwidth_bytes_per_s": bandwidth["bandwidth_bytes_per_s"],
        "page_cache_bandwidth_bytes_per_s": warm_bandwidth["bandwidth_bytes_per_s"],
        "compute_threads": {"offload": offload["compute_threads"], "resident": resident["compute_threads"]},
        "page_cache": cold if cold != "none" else "not dropped (no permission, no posix_fadvise): warm cache",
        "expert_store": prepared["store"],
        "model_bytes": {"experts": prepared["expert_bytes"], "non_expert": prepared["non_expert_bytes"]},
        "peak_rss_bytes": {"offload": offload["peak_rss_bytes"], "resident": resident["peak_rss_bytes"]},
        "peak_gpu_bytes": {"offload": offload["peak_gpu_bytes"], "resident": resident["peak_gpu_bytes"]},
        "rss_after_run_bytes": {
            "offload": offload["rss_after_bytes"],
            "resident": resident["rss_after_bytes"],
        },
        # (resident RSS after its run - offload peak RSS) / bytes not resident; >= 0.5 is the target
        "rss_saving_vs_offloaded_bytes": (resident["rss_after_bytes"] - offload["peak_rss_bytes"])
        / max(1, offload["offloaded_bytes"] - offload["resident_expert_bytes"]),
        "settings": dataclasses.asdict(settings),
    }
    if accelerate is not None:
        tps_acc = sum(len(t) for t in accelerate["tokens"]) / accelerate["seconds"]
        result["tokens_per_s_accelerate"] = tps_acc
        result["speedup_vs_accelerate"] = tps / tps_acc
        result["peak_rss_bytes"]["accelerate"] = accelerate["peak_rss_bytes"]
        result["peak_gpu_bytes"]["accelerate"] = accelerate["peak_gpu_bytes"]
        result["accelerate_devices"] = accelerate["devices"]
        result["tokens_match_accelerate"] = accelerate["tokens"] == resident["tokens"]
    return result


def _main(argv: list[str]) -> int:
    mode, ckpt, settings_json, cache_dir, out = argv
    raw = json.loads(settings_json)
    raw["prefetch"] = tuple(raw["prefetch"])
    settings = OffloadBenchSettings(**raw)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    result = _CHILDREN[mode](Path(ckpt), settings, cache_dir)
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
