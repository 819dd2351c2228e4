"""Serve with the routed experts offloaded to disk and only a budget of them kept in RAM.

The engine reads each layer's routed experts from the checkpoint files on demand and caches
``--budget`` of them per layer; the tokens are the same as with every expert resident. This script
serves the same batch both ways, checks that, and prints the cache statistics.

    python examples/offload_budget.py                       # the embedded demo model, 25% budget
    python examples/offload_budget.py --budget 10% --prefetch router --tokens 32
    python examples/offload_budget.py --model ./olmoe --budget 2GB
"""

from __future__ import annotations

import argparse
import time

import transformers

from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.offload import OffloadConfig

PROMPTS = ["12 + 35 =", "def total(xs):", "The city of", "key: 7f ->", "sort: 9 4 1 ->", "cipher abc ->"]


def timed_generate(engine: MultiAdapterEngine, requests: list[Request], config: DecodeConfig):
    engine.generate([Request(PROMPTS[0], max_new_tokens=1)])  # warm-up, not timed
    start = time.perf_counter()
    done = engine.generate(requests, config)
    return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo", help="checkpoint directory or 'demo' (default)")
    parser.add_argument("--budget", default="25%", help="share ('25%%') or bytes ('2GB') of experts in RAM")
    parser.add_argument("--policy", default="lru", choices=("lru", "lfu"), help="eviction policy")
    parser.add_argument("--prefetch", action="append", default=[], choices=("router", "trajectory"))
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per request (default 24)")
    parser.add_argument("--requests", type=int, default=12, help="requests in the batch (default 12)")
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()

    requests = [Request(PROMPTS[i % len(PROMPTS)], id=i) for i in range(args.requests)]
    config = DecodeConfig(max_new_tokens=args.tokens)  # greedy

    resident = MultiAdapterEngine.from_pretrained(args.model)
    want = resident.generate(requests, config)
    resident.close()

    offload = OffloadConfig(
        tier="disk", budget=args.budget, policy=args.policy, prefetch=tuple(args.prefetch)
    )
    engine = MultiAdapterEngine.from_pretrained(args.model, offload=offload)
    got, offload_s = timed_generate(engine, requests, config)

    same = all(a.token_ids == b.token_ids for a, b in zip(want, got))
    tokens = sum(len(c.token_ids) for c in got)
    tier, stats = engine.offload, engine.offload.stats
    in_ram, total = tier.resident_expert_bytes() / 1e6, tier.offloaded_bytes() / 1e6
    print(f"{args.model}: {len(requests)} requests, {tokens} tokens, budget {args.budget} ({args.policy})")
    print(f"  expert slots per layer   {tier.num_slots}")
    print(f"  routed experts in RAM    {in_ram:.1f} MB of {total:.1f} MB")
    print(f"  hit rate                 {stats.hit_rate:.3f} (warm-up included)")
    print(f"  read from disk           {stats.bytes_read / 1e6:.1f} MB")
    print(f"  tokens/s                 {tokens / offload_s:.1f}")
    print(f"  same tokens as resident  {'yes' if same else 'NO'}")
    print(f"  first completion         {got[0].completion!r}")
    engine.close()
    if not same:
        raise SystemExit("offloaded tokens differ from the resident ones")


if __name__ == "__main__":
    main()
