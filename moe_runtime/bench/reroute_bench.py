"""``bench reroute``: one mixed batch over many ESFT adapters against the ways to do without rerouting.

    adapters  N random ESFT adapters: a random 5-10% of each layer's experts, perturbed, written as
              adapter directories and loaded through ``MultiAdapterEngine.add_adapter``
    requests  R per adapter + R on the base model, random prompt lengths and token limits
    mixed     every request in one batch, each token with its adapter's experts      -> t_mixed
    (a) base  the same prompts and limits on the bare base model (stock experts)     -> t_base
        base via the runtime: the same requests, every one on the base model            -> t_base_runtime
              (separates the cost of rerouting from the speed of the experts kernel)
    (b) swap  per adapter: copy its experts into the base weights, run its requests,
              copy the base experts back                                            -> t_swap
    (c) merged  N separately merged models: memory only, from bytes

All three runs use the same generation loop and generate the same number of tokens (EOS ignored).
Runs are interleaved (the order rotates every repeat) and medians reported. With ``device="cuda"`` the
model, the arena and the swap baseline's tuned slices live on the GPU, and every timed run ends with
a device synchronization.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..models import MoEModelInfo, find_moe_layers, load_model, model_fingerprint, split_expert
from ..models.weights import fuse_slices
from ..runtime import DecodeConfig, MultiAdapterEngine, Request, generate_batch
from ..tuning.esft import (
    ExpertSelection,
    read_adapter,
    read_expert_config,
    replaced_fingerprint,
    write_adapter,
)

__all__ = ["bench_reroute", "write_random_adapters"]


def write_random_adapters(
    model: torch.nn.Module,
    info: MoEModelInfo,
    out: Path,
    count: int,
    *,
    share: tuple[float, float] = (0.05, 0.10),
    scale: float = 0.1,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``count`` ESFT adapters, each tuning a random ``share`` of every MoE layer's experts.

    Tuned weights are the base weights plus Gaussian noise of ``scale`` times their std.

    Returns:
        ``{name: directory}``.
    """
    generator = torch.Generator().manual_seed(seed)
    base_fp = model_fingerprint(model)
    dirs = {}
    for i in range(count):
        experts = {}
        for layer in info.layers:
            low, high = (max(1, round(s * layer.num_experts)) for s in share)
            k = int(torch.randint(low, high + 1, (1,), generator=generator))
            experts[layer.index] = sorted(torch.randperm(layer.num_experts, generator=generator)[:k].tolist())
        selection = ExpertSelection(experts=experts)
        tuned = {}
        for layer_index, ids in experts.items():
            for expert in ids:
                classic = split_expert(info.by_index(layer_index), expert)
                tuned[(layer_index, expert)] = {
                    n: t + (scale * t.float().std() * torch.randn(t.shape, generator=generator)).to(t.dtype)
                    for n, t in classic.items()
                }
        name = f"adapter{i:02d}"
        dirs[name] = write_adapter(
            out / name,
            info=info,
            selection=selection,
            tuned=tuned,
            replaced=replaced_fingerprint(model, info, selection),
            base_fingerprint=base_fp,
            training={"bench": "reroute", "scale": scale},
        )
    return dirs


def _prompts(model_name: str | Path, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Windows of demo-domain text when the model has a tokenizer, random ids otherwise."""
    try:
        from ..demo.tasks import general_texts
        from ..models import load_tokenizer

        stream = load_tokenizer(model_name)(" ".join(general_texts(20, seed=seed)))["input_ids"]
    except Exception:  # noqa: BLE001 - no tokenizer or demo data: timing does not need real text
        stream = []
    if len(stream) < sum(lengths):
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in lengths]
    out, start = [], 0
    for n in lengths:
        out.append(list(stream[start : start + n]))
        start += n
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _swap_plan(engine: MultiAdapterEngine, dirs: dict[str, Path]) -> dict[str, list[tuple]]:
    """Per adapter: (fused parameter, expert id, tuned slice) for every slice its merge overwrites."""
    plan = {}
    for name, path in dirs.items():
        adapter = read_adapter(path)
        adapter.check(engine.model, engine.info)
        writes = []
        for (layer_index, expert), classic in adapter.experts.items():
            layer = engine.info.by_index(layer_index)
            for param_name, value in fuse_slices(layer.layout, classic).items():
                param = getattr(layer.experts, param_name)
                writes.append((param, expert, value.to(param.device, param.dtype).contiguous()))
        plan[name] = writes
    return plan


def bench_reroute(
    model_name: str | Path,
    *,
    adapters: int = 20,
    requests_per_adapter: int = 2,
    prompt_lengths: tuple[int, int] = (16, 64),
    new_tokens: tuple[int, int] = (16, 32),
    repeats: int = 5,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
) -> dict:
    """Latency of a mixed batch vs the base model alone and vs adapter swapping; memory vs ideal.

    ``device``: where the model runs (``cpu`` or ``cuda``); the adapters are written from CPU weights.
    ``dtype``: the model's dtype (None: the checkpoint's; ``bfloat16`` takes the grouped-GEMM kernel on
    a Hopper GPU, float32 the per-expert fallback of ``torch._grouped_mm``).

    Returns:
        JSON-able results: ``adapters``, ``latency_ratio_vs_base``, ``speedup_vs_swap``,
        ``memory_ratio_vs_ideal``, raw times (medians and every run) and bytes.
    """
    compute = torch.device(device)
    cpu_model = load_model(model_name, dtype=dtype)  # adapters are written from CPU weights
    model = cpu_model if compute.type == "cpu" else load_model(model_name, dtype=dtype).to(compute)
    engine = MultiAdapterEngine(model)
    info = engine.info
    vocab = model.config.get_text_config().vocab_size
    owners = [None] * requests_per_adapter + [
        f"adapter{a:02d}" for _ in range(requests_per_adapter) for a in range(adapters)
    ]
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_lengths[0], prompt_lengths[1] + 1, (len(owners),), generator=generator)
    limits = torch.randint(new_tokens[0], new_tokens[1] + 1, (len(owners),), generator=generator).tolist()
    prompts = _prompts(model_name, lengths.tolist(), vocab, seed)
    requests = [Request(p, a, n, id=i) for i, (p, a, n) in enumerate(zip(prompts, owners, limits))]
    config = DecodeConfig(stop_on_eos=False, max_batch_size=len(requests))

    with tempfile.TemporaryDirectory(prefix="moe-reroute-bench-") as tmp:
        dirs = write_random_adapters(cpu_model, find_moe_layers(cpu_model), Path(tmp), adapters, seed=seed)
        start = time.perf_counter()
        for name, path in dirs.items():
            engine.add_adapter(name, path)
        load_s = (time.perf_counter() - start) / adapters
        swap_plan = _swap_plan(engine, dirs)
        tuned_bytes = sum(  # from the adapters' own configs, independently of the arena's accounting
            len(ids) * info.by_index(layer).expert_bytes
            for path in dirs.values()
            for layer, ids in read_expert_config(path / "expert_cfg.json").experts.items()
        )

    groups: dict[str | None, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.adapter, []).append(i)

    def run_loop(indices: list[int]) -> None:
        generate_batch(
            model,
            [prompts[i] for i in indices],
            [limits[i] for i in indices],
            config=config,
            eos_ids=set(),
            pad_id=0,
        )

    def mixed() -> None:
        engine.generate(requests, config)

    def base() -> None:
        with engine.stock():
            run_loop(list(range(len(requests))))

    base_requests = [Request(r.prompt, None, r.max_new_tokens, id=r.id) for r in requests]

    def base_runtime() -> None:
        engine.generate(base_requests, config)

    def swap() -> None:
        with engine.stock(), torch.no_grad():
            for name, indices in groups.items():
                writes = swap_plan.get(name, [])
                saved = [param[expert].clone() for param, expert, _ in writes]
                for param, expert, value in writes:
                    param[expert].copy_(value)
                run_loop(indices)
                for (param, expert, _), original in zip(writes, saved):
                    param[expert].copy_(original)

    load_before = os.getloadavg()[0]
    fns = {"mixed": mixed, "base": base, "base_runtime": base_runtime, "swap": swap}
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for repeat in range(repeats):
        names = list(fns)
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            _synchronize(compute)
            start = time.perf_counter()
            fns[name]()
            _synchronize(compute)
            runs[name].append(time.perf_counter() - start)
    t = {name: statistics.median(times) for name, times in runs.items()}

    memory = engine.memory()
    base_bytes = engine.base_bytes()
    served_bytes = base_bytes + memory.held_bytes
    ideal_bytes = base_bytes + tuned_bytes
    tokens = sum(limits)
    return {
        "adapters": adapters,
        "requests": len(requests),
        "generated_tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(compute) if compute.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_average": [load_before, os.getloadavg()[0]],  # 1-min, before/after: other work skews times
        "latency_ratio_vs_base": t["mixed"] / t["base"],
        "latency_ratio_vs_base_runtime": t["mixed"] / t["base_runtime"],
        "speedup_vs_swap": t["swap"] / t["mixed"],
        "memory_ratio_vs_ideal": served_bytes / ideal_bytes,
        "mixed_s": t["mixed"],
        "base_s": t["base"],
        "base_runtime_s": t["base_runtime"],
        "swap_s": t["swap"],
        "mixed_tokens_per_s": tokens / t["mixed"],
        "base_tokens_per_s": tokens / t["base"],
        "swap_tokens_per_s": tokens / t["swap"],
        "load_s_per_adapter": load_s,
        "base_bytes": base_bytes,
        "tuned_expert_bytes": tuned_bytes,
        "arena_bytes": memory.held_bytes,
        "served_bytes": served_bytes,
        "ideal_bytes": ideal_bytes,
        "merged_models_bytes": adapters * base_bytes,
        "memory_saving_vs_merged": adapters * base_bytes / served_bytes,
        "tuned_expert_share": memory.live_slots / (adapters * info.num_routed_experts),
        "mixed_runs": runs["mixed"],
        "base_runs": runs["base"],
        "base_runtime_runs": runs["base_runtime"],
        "swap_runs": runs["swap"],
    }
