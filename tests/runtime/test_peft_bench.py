"""``bench peft-mixed`` on a tiny model: both ways of serving give the same greedy tokens."""

from __future__ import annotations

from moe_runtime.bench.peft_bench import bench_peft_mixed
from moe_runtime.testing import save_random_checkpoint


def test_peft_mixed_bench_serves_the_same_tokens_as_peft(tmp_path):
    model = save_random_checkpoint("qwen3_moe", tmp_path / "base", seed=3)
    result = bench_peft_mixed(str(model), adapters=2, requests_per_adapter=1, new_tokens=3, rank=2, repeats=1)
    assert result["requests"] == 2 and result["adapters"] == 2
    assert result["token_agreement"] == 1.0
    assert result["mixed_batch_s"] > 0 and result["peft_one_at_a_time_s"] > 0
