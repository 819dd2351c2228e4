"""ESFT with offloaded frozen experts on the DeepSeek-V2-Lite shape (#17, "Tuning"), run by hand.

    python docs/bench/tune_offload.py --big /work/big/dsv2-lite --reduced /tmp/tuneoff/dsv2-3 \
        --work /tmp/tuneoff/bench --json docs/bench/tune_offload.json

1. exactness: one ESFT step (loss and every trainable gradient) resident vs offloaded on the reduced
   copy (same widths, fewer layers), float32 compute, slots at top-k in bf16;
2. step time and peak RSS of ``tune --method esft`` on the reduced copy, resident and offloaded, with
   the same flags as the full-size run;
3. the full-size run: ``tune --method esft --offload disk`` on the 31.4 GB checkpoint (4 x 256 tokens a
   step), then ``convert --to esft-official``.

Every tune runs as a child under ``/usr/bin/time -v`` (peak RSS: its maximum resident set size); a
watchdog kills a child whose RSS passes ``--rss-limit``. Big runs hold ``/work/big/LOCK``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = Path("/work/big/LOCK")
WORDS = "the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing matches".split()


def _data(work: Path) -> Path:
    """16 examples of well over 256 tokens (cut to --max-length)."""
    path = work / "train.jsonl"
    rows = [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(600))} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _selection(work: Path, layers: list[int], per_layer: int = 2) -> Path:
    path = work / f"expert_cfg_{'_'.join(map(str, layers))}.json"
    experts = {str(layer): list(range(per_layer)) for layer in layers}
    path.write_text(json.dumps({"experts": experts, "shared_experts": False, "non_expert_modules": False}))
    return path


def _lock(name: str, wait_s: float) -> None:
    start = time.time()
    while True:
        try:
            LOCK.mkdir()
            (LOCK / "owner").write_text(name)
            return
        except FileExistsError:
            if time.time() - start > wait_s:
                raise SystemExit(f"{LOCK} still held after {wait_s:.0f} s") from None
            time.sleep(15)


def _unlock() -> None:
    for child in LOCK.iterdir():
        child.unlink()
    LOCK.rmdir()


def _run(argv: list[str], rss_limit: int, log: Path) -> dict:
    """Run a CLI command as a child under /usr/bin/time -v; its wall time, peak RSS, output."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moe_runtime", *argv]
    print("$ moe-runtime " + " ".join(argv), flush=True)
    start = time.time()
    with log.open("w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        watched, killed, seen = psutil.Process(child.pid), False, 0
        while child.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in watched.children(recursive=True))
            except psutil.Error:  # a child ended between the listing and the query
                rss = 0
            seen = max(seen, rss)
            if rss > rss_limit and not killed:
                os.killpg(child.pid, signal.SIGKILL)  # /usr/bin/time and the python under it
                killed = True
            time.sleep(0.5)
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    result = {
        "command": "moe-runtime " + " ".join(argv),
        "rc": child.returncode,
        "wall_s": time.time() - start,
        "peak_rss_bytes": int(peak[1]) * 1024 if peak else None,
        "killed_over_rss_limit": killed,
        "watchdog_max_rss_bytes": seen,
        "offload_line": next((line for line in text.splitlines() if line.startswith("offload:")), None),
        "result_line": next((line for line in text.splitlines() if line.startswith("trained ")), None),
    }
    print(json.dumps(result, indent=2), flush=True)
    if child.returncode != 0:
        print(text[-3000:], file=sys.stderr)
    return result


def _training(out: Path) -> dict:
    meta = json.loads((out / "moe_runtime_adapter.json").read_text())
    return meta.get("training", meta)


def _tune_args(model: Path, data: Path, cfg: Path, out: Path, steps: int, offload: bool) -> list[str]:
    argv = ["tune", "--model", str(model), "--data", str(data), "--method", "esft", "--experts", str(cfg),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--grad-accum", "4",
            "--max-length", "256", "--lr", "1e-5", "--profile-tokens", "0", "--compute-dtype", "float32",
            "--gradient-checkpointing", "--threads", "2"]  # fmt: skip
    if offload:
        argv += ["--offload", "disk", "--expert-budget", "10%", "--slot-dtype", "storage"]
    return argv


def exactness(model: str, cfg: str, tokens: int) -> dict:
    """One ESFT step resident, then offloaded (one process, one model at a time): max differences."""
    import gc

    import torch

    from moe_runtime.models import find_moe_layers, load_model
    from moe_runtime.runtime.offload import OffloadConfig, OffloadTier, load_offloaded_model
    from moe_runtime.tuning.esft import read_expert_config
    from moe_runtime.tuning.esft.tuner import prepare_esft

    torch.manual_seed(0)
    selection = read_expert_config(cfg)
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step(net, info, tier=None):
        net.config.output_router_logits = True
        arena, _ = prepare_esft(net, info, selection, tier)
        start = time.perf_counter()
        out = net(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        seconds = time.perf_counter() - start
        grads = {n: p.grad.clone() for n, p in arena.named_parameters()}
        arena.detach()
        return out.loss.item(), grads, seconds

    resident = load_model(model, dtype="float32")
    loss, grads, resident_s = step(resident, find_moe_layers(resident))
    del resident
    gc.collect()
    net, info, store = load_offloaded_model(model, dtype=torch.float32)
    tier = OffloadTier(info, store, OffloadConfig(budget="10%", slot_dtype="storage"))
    try:
        got_loss, got_grads, offloaded_s = step(net, info, tier)
        stats = tier.stats.to_json()
    finally:
        tier.close()
    diffs = {n: (got_grads[n] - g).abs().max().item() for n, g in grads.items()}
    scale = {n: g.abs().max().item() for n, g in grads.items()}
    return {
        "tokens": tokens,
        "loss_resident": loss,
        "loss_offloaded": got_loss,
        "loss_abs_diff": abs(got_loss - loss),
        "grad_max_abs_diff": max(diffs.values()),
        "grad_max_abs": max(scale.values()),
        "grads_compared": len(diffs),
        "within_1e-6": abs(got_loss - loss) <= 1e-6 * max(1.0, abs(loss))
        and all(d <= 1e-6 + 1e-6 * scale[n] for n, d in diffs.items()),
        "step_s_resident": resident_s,
        "step_s_offloaded": offloaded_s,
        "offload_stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big", type=Path, default=Path("/work/big/dsv2-lite"))
    parser.add_argument("--reduced", type=Path, required=True, help="a 3-layer copy of the same shape")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rss-limit", type=float, default=11.8e9)
    parser.add_argument("--lock-wait", type=float, default=3600)
    parser.add_argument("--skip", nargs="*", default=[], choices=("exact", "reduced", "big"))
    parser.add_argument(
        "--exactness-child", nargs=3, metavar=("MODEL", "CFG", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.exactness_child:
        model, cfg, tokens = args.exactness_child
        print("EXACT " + json.dumps(exactness(model, cfg, int(tokens))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = _data(args.work)
    report = json.loads(args.json.read_text()) if args.json.exists() else {}
    limit = int(args.rss_limit)
    reduced_cfg = _selection(args.work, [1, 2])
    if "exact" not in args.skip:
        _lock("tuneoff (exactness, resident reduced copy)", args.lock_wait)
        try:
            log = args.work / "exact.log"
            argv = [sys.executable, __file__, "--reduced", str(args.reduced), "--work", str(args.work),
                    "--json", str(args.json), "--exactness-child", str(args.reduced), str(reduced_cfg), "256"]  # fmt: skip
            proc = subprocess.run(
                argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            log.write_text(proc.stdout + proc.stderr)
            line = next(line for line in proc.stdout.splitlines() if line.startswith("EXACT "))
            report["exactness_reduced"] = json.loads(line[len("EXACT ") :])
            print(json.dumps(report["exactness_reduced"], indent=2), flush=True)
        finally:
            _unlock()
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if "reduced" not in args.skip:
        for name, offload in (("resident_reduced", False), ("offloaded_reduced", True)):
            out = args.work / name
            if not offload:
                _lock("tuneoff (resident reduced tune)", args.lock_wait)
            try:
                run = _run(
                    _tune_args(args.reduced, data, reduced_cfg, out, 2, offload),
                    limit,
                    args.work / f"{name}.log",
                )
            finally:
                if not offload:
                    _unlock()
            if run["rc"] == 0:
                training = _training(out)
                run["steps"] = training["steps"]
                run["step_time_s"] = training["train_runtime_s"] / training["steps"]
            report[name] = run
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if "big" not in args.skip:
        big_cfg = _selection(args.work, [1, 9, 18])
        out = args.work / "big_adapter"
        plan = subprocess.run(
            [
                sys.executable,
                "-m",
                "moe_runtime",
                *_tune_args(args.big, data, big_cfg, out, args.steps, True),
                "--plan",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        report["plan_big"] = json.loads(plan.stdout)
        _lock("tuneoff (full-size offloaded ESFT)", args.lock_wait)
        try:
            run = _run(
                _tune_args(args.big, data, big_cfg, out, args.steps, True), limit, args.work / "big.log"
            )
        finally:
            _unlock()
        if run["rc"] == 0:
            training = _training(out)
            run["steps"] = training["steps"]
            run["step_time_s"] = training["train_runtime_s"] / training["steps"]
            official = args.work / "big_official"
            conv = _run(["convert", "--adapter", str(out), "--to", "esft-official", "--out", str(official)],
                        limit, args.work / "convert.log")  # fmt: skip
            run["official_export"] = {
                "rc": conv["rc"],
                "files": sorted(p.name for p in official.iterdir()) if official.exists() else [],
            }
        report["offloaded_full"] = run
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
