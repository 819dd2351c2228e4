"""bench scale on a reduced-width copy: the fields CLI.md names, tokens equal to resident, nothing left behind."""

from __future__ import annotations

import pytest

from moe_runtime.bench.scale_bench import ScaleBenchSettings, bench_scale
from moe_runtime.cli.bench import SCALE_SHAPES
from moe_runtime.testing import shapes


def test_scale_shapes_are_the_writers():
    assert set(SCALE_SHAPES) == set(shapes.SHAPES)


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path):
    settings = ScaleBenchSettings(
        shape="deepseek-v2-lite", layers=3, budget="50%", widths=shapes.TINY_WIDTHS["deepseek-v2-lite"],
        prompts=2, prompt_len=6, new_tokens=3, pack=True, accelerate=False,
    )  # fmt: skip
    result = bench_scale(settings, workdir=tmp_path)
    for field in ("shape", "checkpoint_bytes", "budget_bytes", "peak_rss_bytes", "tokens_per_s",
                  "bound_tokens_per_s", "bound_fraction"):  # fmt: skip
        assert result[field] is not None, field
    assert result["tokens_per_s_accelerate"] is None  # skipped here (its child runs in test_offload_bench)
    assert result["tokens_equal_resident"] is True
    assert result["prefill_bytes_read"] > 0 and result["store"] == "checkpoint"
    assert (
        result["tokens_equal_packed"] is True and result["pack_disk_bytes"] > 0 and result["pack_build_s"] > 0
    )
    assert result["layers"] == 3 and result["compute_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # written checkpoint and caches deleted
