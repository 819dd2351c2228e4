"""Prefill of several prompts with offloaded experts: batched (one forward) against one at a time.

    python docs/bench/prefill_batched.py --shape olmoe-1b-7b --layers 2 --workdir /tmp/prefill_bench \\
        --json docs/bench/prefill_batched.json

Writes a random checkpoint of the shape (``moe_runtime.testing.shapes``: real widths, bf16, the hub's
per-expert layout) into the work directory unless it is there, then serves the same prompts with
``--offload disk`` (float32 compute, LRU, no prefetch unless ``--prefetch router``) in fresh child
processes, the checkpoint's page cache dropped before each ``generate`` call (``posix_fadvise DONTNEED``
on its files; ``--warm``: only before each process), as for a model larger than the page cache:

    one_at_a_time   engine.generate([request]) for each prompt in turn (one prefill forward each)
    batched         engine.generate(requests): the scheduler prefills them in one left-padded forward
    batched_chunked the same with OffloadConfig(chunk_tokens=--chunk): bytes read must not change

With ``--repeats N`` the modes alternate N times; times are medians. Each reports the offload tier's per-phase counters (``OffloadStats.phases``: bytes read, misses,
seconds of the prefill and decode forwards), the distinct experts the prompts route to per layer
(``touched``, from the batched run) and the tokens, which must be equal in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("one_at_a_time", "batched", "batched_chunked")


def drop_checkpoint_cache(path: Path) -> None:
    """Evict the checkpoint's files from the page cache (this process's files only; no privilege)."""
    os.sync()
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def child(mode: str, ckpt: Path, settings: dict) -> dict:
    """One configuration in this process."""
    import torch

    from moe_runtime.bench.memory import peak_rss_bytes
    from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
    from moe_runtime.runtime.offload import OffloadConfig

    config = OffloadConfig(
        budget=settings["budget"],
        prefetch=tuple(settings["prefetch"]),
        chunk_tokens=settings["chunk"] if mode == "batched_chunked" else None,
    )
    load = time.perf_counter()
    engine = MultiAdapterEngine.from_pretrained(ckpt, dtype="auto", offload=config)
    load = time.perf_counter() - load
    vocab = engine.model.get_input_embeddings().num_embeddings
    requests = [Request(p, id=i) for i, p in enumerate(prompts(vocab, settings["lengths"], settings["seed"]))]
    decode = DecodeConfig(max_new_tokens=settings["new_tokens"], stop_on_eos=False)
    routed: dict[int, torch.Tensor] = {}  # the prefill's top_k_index per layer (the first forward)

    def observe(layer: int, top_k_index: torch.Tensor) -> None:
        routed.setdefault(layer, top_k_index.clone())

    engine.executor.observer = observe if mode == "batched" else None
    batches = [[r] for r in requests] if mode == "one_at_a_time" else [requests]
    done, seconds = [], 0.0
    with torch.no_grad():
        for batch in batches:
            if settings["cold"]:
                drop_checkpoint_cache(ckpt)
            start = time.perf_counter()
            done += engine.generate(batch, decode)
            seconds += time.perf_counter() - start
    stats = engine.offload.stats
    store = engine.offload.store
    out = {
        "mode": mode,
        "load_s": load,
        "seconds": seconds,
        "tokens": [c.token_ids for c in done],
        "peak_rss_bytes": peak_rss_bytes(),
        "slots_per_layer": engine.offload.num_slots,
        "expert_bytes": {str(layer.index): store.expert_bytes(layer.index) for layer in engine.info.layers},
        "chunk_tokens": {
            str(layer.index): engine.offload.chunk_tokens(layer) for layer in engine.info.layers
        },
        "stats": stats.to_json(),
    }
    if routed:
        from moe_runtime.runtime.generation import left_pad

        valid = left_pad([r.prompt for r in requests], 0)[1].reshape(-1).bool()
        out["touched"] = {
            str(layer): len(set(ids[valid].reshape(-1).tolist())) for layer, ids in sorted(routed.items())
        }
    return out


def run_child(mode: str, ckpt: Path, settings: dict) -> dict:
    drop_checkpoint_cache(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--child", mode, str(ckpt), json.dumps(settings), str(result)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {mode} run failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def summary(runs: dict[str, list[dict]]) -> dict:
    """Bytes and misses of the first repeat (they are the same in every one: checked), times as medians."""

    def phase(mode: str, name: str, key: str):
        values = [run["stats"]["phases"][name][key] for run in runs[mode]]
        if key in ("bytes_read", "misses"):
            assert len(set(values)) == 1, (mode, name, key, values)
            return values[0]
        return statistics.median(values)

    def wall(mode: str) -> float:
        return statistics.median(run["seconds"] for run in runs[mode])

    batched = runs["batched"][0]
    touched = batched["touched"]
    bound = sum(n * batched["expert_bytes"][layer] for layer, n in touched.items())
    tokens = [run["tokens"] for mode in MODES for run in runs[mode]]
    return {
        "tokens_equal": all(t == tokens[0] for t in tokens),
        "repeats": len(runs["batched"]),
        "prefill_bytes_one_at_a_time": phase("one_at_a_time", "prefill", "bytes_read"),
        "prefill_bytes_batched": phase("batched", "prefill", "bytes_read"),
        "prefill_bytes_batched_chunked": phase("batched_chunked", "prefill", "bytes_read"),
        "prefill_bytes_touched_bound": bound,
        "prefill_bytes_ratio": phase("one_at_a_time", "prefill", "bytes_read")
        / phase("batched", "prefill", "bytes_read"),
        "prefill_misses_one_at_a_time": phase("one_at_a_time", "prefill", "misses"),
        "prefill_misses_batched": phase("batched", "prefill", "misses"),
        "touched_experts_per_layer": touched,
        "prefill_s_one_at_a_time": phase("one_at_a_time", "prefill", "seconds"),
        "prefill_s_batched": phase("batched", "prefill", "seconds"),
        "prefill_s_batched_chunked": phase("batched_chunked", "prefill", "seconds"),
        "prefill_stall_s_one_at_a_time": phase("one_at_a_time", "prefill", "stall_s"),
        "prefill_stall_s_batched": phase("batched", "prefill", "stall_s"),
        "prefill_speedup": phase("one_at_a_time", "prefill", "seconds")
        / phase("batched", "prefill", "seconds"),
        "decode_bytes_one_at_a_time": phase("one_at_a_time", "decode", "bytes_read"),
        "decode_bytes_batched": phase("batched", "decode", "bytes_read"),
        "wall_s_one_at_a_time": wall("one_at_a_time"),
        "wall_s_batched": wall("batched"),
        "wall_speedup": wall("one_at_a_time") / wall("batched"),
        "peak_rss_bytes": {mode: max(run["peak_rss_bytes"] for run in runs[mode]) for mode in MODES},
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, ckpt, settings, out = sys.argv[2:6]
        result = child(mode, Path(ckpt), json.loads(settings))
        Path(out).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="olmoe-1b-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "prefill_bench"))
    parser.add_argument("--checkpoint", help="use this checkpoint instead of writing one")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--lengths", default="12,24,36,48", help="prompt lengths (token ids)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16, help="chunk_tokens of the batched_chunked run")
    parser.add_argument("--prefetch", action="append", default=[], choices=("router", "trajectory"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every mode (times: medians)")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="keep the page cache between requests (default: dropped before each generate call, as for a "
        "model larger than the page cache, whose re-reads go to the disk)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        from moe_runtime.testing.shapes import shape_config, write_checkpoint

        ckpt = Path(args.workdir) / f"{args.shape}-{args.layers}l"
        if not ckpt.is_dir():
            write_checkpoint(shape_config(args.shape, layers=args.layers), ckpt, progress=True)
    settings = {
        "budget": args.budget,
        "prefetch": args.prefetch,
        "lengths": [int(n) for n in args.lengths.split(",")],
        "new_tokens": args.new_tokens,
        "chunk": args.chunk,
        "seed": args.seed,
        "cold": not args.warm,
    }
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):  # the modes alternate, so load swings hit them alike
        for mode in MODES:
            runs[mode].append(run_child(mode, ckpt, settings))
    result = {
        "bench": "prefill_batched",
        "shape": args.shape,
        "layers": args.layers,
        "settings": settings,
        "summary": summary(runs),
        "runs": runs,
    }
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        from moe_runtime.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
