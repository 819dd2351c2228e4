"""Peak RSS: offloading at a 25% budget saves at least half of the offloaded expert bytes."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_peak_rss_below_resident(tmp_path):
    from moe_runtime.bench.offload_bench import OffloadBenchSettings, _checkpoint, _run_child

    settings = OffloadBenchSettings(
        hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_experts=16, vocab_size=512,
        prompts=1, prompt_len=8, new_tokens=4, accelerate=False,
    )  # fmt: skip
    ckpt = _checkpoint(settings, tmp_path)
    _run_child("prepare", ckpt, settings, tmp_path)  # the packed expert file is made once, beforehand
    resident = _run_child("resident", ckpt, settings, tmp_path)
    offload = _run_child("offload", ckpt, settings, tmp_path)
    assert offload["tokens"] == resident["tokens"]
    offloaded = offload["offloaded_bytes"] - offload["resident_expert_bytes"]
    assert offloaded > 100e6
    saving = resident["peak_rss_bytes"] - offload["peak_rss_bytes"]
    assert saving >= 0.5 * offloaded, (
        saving,
        offloaded,
        resident["peak_rss_bytes"],
        offload["peak_rss_bytes"],
    )
