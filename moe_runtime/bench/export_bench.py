"""``bench export``: peak memory of ``export`` against the size of the checkpoint it merges into.

    checkpoint  a random float32 Mixtral-architecture model, 12 layers of 16 experts (hidden and expert
                width 512), ~610 MB with per-expert tensors on disk, built once into the cache
    adapters    esft (2 tuned experts in every MoE layer) and esft-lora-merge (the same experts,
                rank 8), made once beside it
    runs        each in its own process, as the ``export`` command runs (``unmap_freed_tensors``),
                peak RSS = VmHWM of that process:
                floor      python, torch and transformers imported, the model built on the meta device
                streaming  ``export`` as it is: one MoE layer's experts read at a time
                loaded     the same merge into the whole base model loaded first (how ``export`` worked
                           before, and still works for models holding tensors the files do not store)
    check       the streaming and loaded exports hold bit-identical tensors

Shards are capped at ``max_shard_bytes`` (100 MB by default), so "one shard" is a fifth of the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .memory import peak_rss_bytes

__all__ = ["bench_export"]

ADAPTERS = ("esft", "esft-lora-merge")


def _make_adapters(ckpt: Path, out: Path) -> dict[str, str]:
    """Both adapters for ``ckpt`` (made once): experts 0 and 3 of every MoE layer."""
    import torch

    from ..models import find_moe_layers, load_model, model_fingerprint, split_expert
    from ..tuning.esft import ExpertSelection, replaced_fingerprint, write_adapter
    from ..tuning.esft_lora_merge import write_adapter as write_esft_lora
    from ..tuning.esft_lora_merge.trainable import weight_names

    paths = {name: out / name for name in ADAPTERS}
    if all((p / "moe_runtime_adapter.json").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    model = load_model(ckpt)
    info = find_moe_layers(model)
    selection = ExpertSelection(experts={layer: [0, 3] for layer in info.layer_indices})
    generator = torch.Generator().manual_seed(0)
    tuned, factors = {}, {}
    for layer, ids in selection.experts.items():
        moe = info.by_index(layer)
        for expert in ids:
            classic = split_expert(moe, expert)
            tuned[(layer, expert)] = {
                n: t + 0.1 * t.std() * torch.randn(t.shape, generator=generator) for n, t in classic.items()
            }
            factors[(layer, expert)] = {
                n: (
                    torch.randn((8, classic[n].shape[1]), generator=generator) * 0.01,
                    torch.randn((classic[n].shape[0], 8), generator=generator) * 0.01,
                )
                for n in [*weight_names(moe), "down_proj.weight"]
            }
    fingerprints = {
        "replaced": replaced_fingerprint(model, info, selection),
        "base_fingerprint": model_fingerprint(model),
    }
    write_adapter(paths["esft"], info=info, selection=selection, tuned=tuned, **fingerprints)
    write_esft_lora(
        paths["esft-lora-merge"],
        info=info,
        selection=selection,
        factors=factors,
        rank=8,
        alpha=16.0,
        **fingerprints,
    )
    return {k: str(v) for k, v in paths.items()}


def _child(mode: str, ckpt: str, adapter: str, out: str, max_shard_bytes: int) -> dict:
    from ..interop.export import export_merged, source_weights, unmap_freed_tensors

    unmap_freed_tensors()  # as the export command does

    start = time.perf_counter()
    if mode == "floor":
        from ..interop.lazy import LazyCheckpoint

        files = source_weights(Path(ckpt))
        LazyCheckpoint(Path(ckpt), [Path(ckpt) / name for name in files])
        summary = {}
    else:
        summary = export_merged(
            ckpt, adapter, out, max_shard_bytes=max_shard_bytes, load_whole=mode == "loaded"
        )
    return {"peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - start, **summary}


def _run_child(mode: str, ckpt: Path, adapter: str, out: Path, max_shard_bytes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        args = [sys.executable, "-m", "moe_runtime.bench.export_bench", mode, str(ckpt), adapter, str(out),
                str(max_shard_bytes), str(result)]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench export: the {mode} run failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def _tensors_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def load(directory: Path) -> dict:
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    left, right = load(a), load(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def bench_export(
    *, smoke: bool = False, cache_dir: str | Path | None = None, max_shard_bytes: int | None = None
) -> dict:
    """Run the benchmark (see the module docstring); returns the JSON fields of ``bench export``."""
    from ..runtime.offload.store import default_cache_dir
    from .offload_bench import OffloadBenchSettings, _checkpoint

    settings = (
        OffloadBenchSettings.smoke()
        if smoke
        else OffloadBenchSettings(
            hidden_size=512, intermediate_size=512, num_hidden_layers=12, num_experts=16
        )
    )
    max_shard_bytes = max_shard_bytes or (100_000 if smoke else 100 * 10**6)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(settings, cache)
    adapters = _make_adapters(ckpt, cache / f"{ckpt.name}-export-adapters")
    checkpoint_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    expert_layer_bytes = 3 * settings.num_experts * settings.hidden_size * settings.intermediate_size * 4
    runs: dict = {}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        floor = _run_child("floor", ckpt, adapters["esft"], Path(tmp) / "floor", max_shard_bytes)
        for name, adapter in adapters.items():
            outs = {mode: Path(tmp) / f"{name}-{mode}" for mode in ("streaming", "loaded")}
            got = {mode: _run_child(mode, ckpt, adapter, out, max_shard_bytes) for mode, out in outs.items()}
            runs[name] = {
                "peak_rss_bytes": {mode: r["peak_rss_bytes"] for mode, r in got.items()},
                "above_floor_bytes": {
                    mode: r["peak_rss_bytes"] - floor["peak_rss_bytes"] for mode, r in got.items()
                },
                "seconds": {mode: r["seconds"] for mode, r in got.items()},
                "changed_tensors": got["streaming"]["changed_tensors"],
                "shards": got["streaming"]["shards"],
                "outputs_identical": _tensors_equal(outs["streaming"], outs["loaded"]),
            }
            runs[name]["streaming_over_loaded_above_floor"] = runs[name]["above_floor_bytes"][
                "streaming"
            ] / max(1, runs[name]["above_floor_bytes"]["loaded"])
            runs[name]["streaming_above_floor_over_checkpoint"] = (
                runs[name]["above_floor_bytes"]["streaming"] / checkpoint_bytes
            )
    result = {
        "checkpoint_bytes": checkpoint_bytes,
        "max_shard_bytes": max_shard_bytes,
        "one_layer_experts_bytes": expert_layer_bytes,
        "floor_peak_rss_bytes": floor["peak_rss_bytes"],
        "adapters": runs,
    }
    if smoke:
        result["note"] = "smoke size: shows the benchmark runs; its memory figures mean nothing"
    return result


def _main(argv: list[str]) -> int:
    mode, ckpt, adapter, out, max_shard_bytes, result = argv
    Path(result).write_text(json.dumps(_child(mode, ckpt, adapter, out, int(max_shard_bytes))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
