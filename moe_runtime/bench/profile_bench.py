"""``bench profile``: profiling throughput against the plain forward on the same batches."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..data import Example, encode_example
from ..models import install, pad_token_id, uninstall
from ..profiler.recorder import RoutingRecorder
from ..profiler.run import run_batches, token_budget

__all__ = ["bench_profile"]


def bench_profile(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int = 32768,
    repeats: int = 5,
) -> dict:
    """Tokens/s of profiling vs the stock forward, interleaved runs, median of ``repeats``.

    The plain runs use the model's stock experts implementation with nothing installed; the profile
    runs install the hook and attach a recorder (counts and gate sums on every layer).
    """
    sequences = token_budget([encode_example(tokenizer, ex)[0] for ex in examples], max_tokens, max_length)
    tokens = sum(map(len, sequences))
    pad_id = pad_token_id(tokenizer)
    plain, profiled = [], []

    def timed(recorder: RoutingRecorder | None) -> float:
        start = time.perf_counter()
        run_batches(model, sequences, pad_id, batch_size, recorder=recorder)
        return tokens / (time.perf_counter() - start)

    uninstall(model)
    timed(None)  # warm-up
    for _ in range(repeats):
        uninstall(model)
        plain.append(timed(None))
        info = install(model)
        profiled.append(timed(RoutingRecorder(info)))
    uninstall(model)
    forward_tps, profile_tps = statistics.median(plain), statistics.median(profiled)
    return {
        "tokens": tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "forward_tokens_per_s": forward_tps,
        "profile_tokens_per_s": profile_tps,
        "profile_vs_forward": profile_tps / forward_tps,
        "forward_runs": plain,
        "profile_runs": profiled,
    }
