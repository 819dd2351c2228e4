"""``load_model`` gives transformers' own values: every parameter bit-identical to ``from_pretrained``.

``load_model`` reads per-expert checkpoint tensors straight into the fused ``[E, ...]`` parameters,
started before transformers builds the model (see ``_DirectReads`` in moe_runtime/models/loading.py).
Each case loads one small random checkpoint both ways and compares every tensor (dtype, shape, bits):
stacked experts, stacked and joined gate/up (dim 1), a sharded checkpoint, bfloat16 widened to float32
by the reader, a narrowing (transformers converts; no direct read), and a prefetch planned from the
wrong dtype (bfloat16 planned as float32: dropped at the first mismatch, then read as transformers asks).
Tensors stored in the compute dtype are mapped from the file (copy-on-write) rather than read; each
case runs both ways (``MOE_RUNTIME_MAP_WEIGHTS=0`` reads), and the mapped parameters are checked to
be the file's pages and to leave the file unchanged when written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_runtime.models.loading as loading
from moe_runtime.models import load_model
from moe_runtime.testing import build_random_model


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """Counts of the direct path: fused tensors prefetched, handed over, read directly, prefetches dropped."""
    seen = {"planned": 0, "handed": 0, "direct": 0, "dropped": 0}
    prefetch, drop, read = (
        loading._DirectReads.prefetch,
        loading._DirectReads._drop,
        loading._DirectReads.read,
    )

    def counted_prefetch(self, *args):
        prefetch(self, *args)
        seen["planned"] += len(self._ahead)

    def counted_drop(self):
        seen["dropped"] += len(self._ahead)
        drop(self)

    def counted_read(self, items, join):
        before = len(self._ahead)
        out = read(self, items, join)
        seen["direct"] += out is not None
        seen["handed"] += out is not None and len(self._ahead) == before - 1
        return out

    monkeypatch.setattr(loading._DirectReads, "prefetch", counted_prefetch)
    monkeypatch.setattr(loading._DirectReads, "_drop", counted_drop)
    monkeypatch.setattr(loading._DirectReads, "read", counted_read)
    return seen


def _save(tmp_path, family: str, dtype: torch.dtype, shard: str | None = None, **overrides):
    model = build_random_model(family, seed=3, dtype=dtype, **overrides)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    return tmp_path


def _assert_same(path, dtype) -> None:
    ours = load_model(path, dtype=dtype).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype or "auto"
    ).state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        got = ours[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got, tensor), name


def _file_backed(tensor: torch.Tensor, files: list[str]) -> bool:
    """Whether most of ``tensor``'s pages lie in mappings of ``files`` (a page where two of the file's
    ranges meet is a copy; /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        ranges = [
            tuple(int(v, 16) for v in line.split()[0].split("-"))
            for line in maps
            if len(line.split()) >= 6 and line.split()[-1] in files
        ]
    size = tensor.numel() * tensor.element_size()
    pages = range(tensor.data_ptr(), tensor.data_ptr() + size, 4096)
    backed = sum(any(low <= address < high for low, high in ranges) for address in pages)
    return backed > len(pages) / 2


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize(
    ("family", "stored", "dtype", "shard"),
    [
        ("mixtral", torch.float32, None, None),  # w1 + w3 stacked and joined (dim 1), w2 stacked
        ("qwen2_moe", torch.float32, None, "40KB"),  # experts spread over several shards
        ("mixtral", torch.bfloat16, torch.float32, None),  # widened by the reader
    ],
)
def test_direct_reads_are_transformers_values(
    tmp_path, reads, monkeypatch, family, stored, dtype, shard, mapped
):
    monkeypatch.setenv("MOE_RUNTIME_MAP_WEIGHTS", "1" if mapped else "0")
    path = _save(tmp_path, family, stored, shard)
    if shard:
        assert len(list(path.glob("*.safetensors"))) > 2
    _assert_same(path, dtype)
    assert reads["planned"] > 0 and reads["handed"] == reads["direct"] == reads["planned"]
    assert reads["dropped"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_tensors_in_the_compute_dtype_are_the_files_pages(tmp_path, monkeypatch):
    """Stored as computed (float32 here): the fused experts and the other weights are mappings of
    the checkpoint file; a write changes the model only. Widened (bfloat16 -> float32): read."""
    from moe_runtime.ops import extension_available

    if not extension_available():
        pytest.skip("moe_runtime._C is not built")
    monkeypatch.delenv("MOE_RUNTIME_MAP_WEIGHTS", raising=False)
    wide = {"hidden_size": 64, "intermediate_size": 64}  # each expert's tensors a few pages
    path = _save(tmp_path / "f32", "mixtral", torch.float32, **wide)
    files = [os.fspath(f) for f in path.glob("*.safetensors")]
    model = load_model(path)
    experts = model.model.layers[0].mlp.experts
    for tensor in (experts.gate_up_proj, experts.down_proj, model.model.layers[0].self_attn.q_proj.weight):
        assert _file_backed(tensor, files)
    before = [Path(f).read_bytes() for f in files]
    with torch.no_grad():
        experts.gate_up_proj.add_(1.0)
    assert [Path(f).read_bytes() for f in files] == before
    widened = _save(tmp_path / "bf16", "mixtral", torch.bfloat16, **wide)
    model = load_model(widened, dtype=torch.float32)
    files = [os.fspath(f) for f in widened.glob("*.safetensors")]
    assert not _file_backed(model.model.layers[0].mlp.experts.gate_up_proj, files)


def test_a_narrowing_is_transformers_conversion(tmp_path, reads):
    _assert_same(_save(tmp_path, "mixtral", torch.float32), torch.bfloat16)
    assert reads["planned"] == reads["direct"] == 0


def test_a_prefetch_that_does_not_match_is_dropped(tmp_path, reads, monkeypatch):
    prefetch = loading._DirectReads.prefetch  # the counting one
    monkeypatch.setattr(
        loading._DirectReads, "prefetch", lambda self, kind, dtype: prefetch(self, kind, torch.float32)
    )
    _assert_same(_save(tmp_path, "mixtral", torch.bfloat16), None)  # loaded as stored, planned widened
    assert reads["planned"] > 0 and reads["dropped"] == reads["planned"] and reads["handed"] == 0
    assert reads["direct"] > 0  # read straight into the parameters as transformers asks
