"""Resident decode and prefill speed, before/after: two source trees timed interleaved, same threads.

    python docs/bench/resident_load.py write /tmp/mixtral-1.7g 8 16        # the issue's checkpoint
    python docs/bench/resident_decode.py compare /tmp/mixtral-1.7g BEFORE_TREE AFTER_TREE [REPS]

Each measure is a fresh process with ``PYTHONPATH`` set to one tree (each tree with its own built
extension), alternating trees. Batch 1, greedy, 4 prompts of 20-30 random ids: prefill = the prompt's
tokens over the time of a 1-token request; decode = 32 tokens over the extra time of a 33-token request.
Medians over the prompts, at 1 and at 2 torch threads; wall time (``wall``) and, at 1 thread, the
process's CPU time per token (``cpu_ms``: what the work costs when the machine is shared). The tokens
of both trees must be equal.
"""

import json
import os
import subprocess
import sys
import time


def measure(path: str) -> None:
    import torch

    from moe_runtime.models import load_model
    from moe_runtime.runtime import MultiAdapterEngine
    from moe_runtime.runtime.requests import DecodeConfig, Request

    engine = MultiAdapterEngine(load_model(path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (20, 24, 27, 30)]
    config = DecodeConfig(max_new_tokens=32, stop_on_eos=False)
    result = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        engine.generate([Request(prompts[0], max_new_tokens=4)], config)  # warm-up at these threads
        rows = []
        for prompt in prompts:
            c0, t0 = time.process_time(), time.perf_counter()
            engine.generate([Request(prompt, max_new_tokens=1)], config)
            c1, t1 = time.process_time(), time.perf_counter()
            out = engine.generate([Request(prompt, max_new_tokens=33)], config)
            c2, t2 = time.process_time(), time.perf_counter()
            pre_w, pre_c = t1 - t0, c1 - c0
            rows.append({
                "prefill": len(prompt) / pre_w, "decode": 32 / (t2 - t1 - pre_w),
                "decode_cpu_ms": (c2 - c1 - pre_c) / 32 * 1e3, "tokens": out[0].token_ids,
            })  # fmt: skip

        def median(key, rows=rows):
            values = sorted(r[key] for r in rows)
            return values[len(values) // 2]

        result[threads] = {
            "decode_tok_s": round(median("decode"), 1), "prefill_tok_s": round(median("prefill"), 1),
            "decode_cpu_ms": round(median("decode_cpu_ms"), 2), "tokens": [r["tokens"] for r in rows],
        }  # fmt: skip
    print(json.dumps(result))


def compare(path: str, before: str, after: str, reps: int) -> None:
    runs = {"before": [], "after": []}
    for _ in range(reps):
        for name, tree in (("before", before), ("after", after)):
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run(
                [sys.executable, __file__, "measure", path],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    same = all(
        r["1"]["tokens"] == runs["before"][0]["1"]["tokens"] == r["2"]["tokens"]
        for r in runs["before"] + runs["after"]
    )
    table = {}
    for threads in ("1", "2"):
        for key in ("decode_tok_s", "prefill_tok_s", "decode_cpu_ms"):
            b = [r[threads][key] for r in runs["before"]]
            a = [r[threads][key] for r in runs["after"]]
            table[f"{key}@{threads}"] = {"before": b, "after": a, "ratio": round(sum(a) / sum(b), 3)}
    print(json.dumps({"tokens_equal": same, "load": os.getloadavg(), **table}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "measure":
        measure(sys.argv[2])
    else:
        compare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 2)
