"""The compiled ``decode_step`` op against its PyTorch reference and Hugging Face's own forward.

Per supported family, a left-padded prefill by the model's forward, then one decode step three ways on
the same weights and cache: the op, :func:`decode_step_reference`, and the model's forward with its
cache. Tolerance (float32, logits of order 1): atol 2e-5, rtol 1e-4 (sums of the same products in
another order; observed differences are ~1e-7). The op's own results do not depend on the batch it
runs in nor on the thread count (bit-identical).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_runtime.ops import extension_available
from moe_runtime.ops.decode_step import SLOTS, decode_step, decode_step_reference
from moe_runtime.runtime.fast_decode import FastDecode
from moe_runtime.runtime.generation import left_pad
from moe_runtime.testing import build_random_model

requires_extension = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")

TOL = {"atol": 2e-5, "rtol": 1e-4}
# family -> config overrides: full attention for Mixtral (the tiny config's window is 4), Qwen3-MoE
# with a dense first layer and normalised top-k, OLMoE with clipped q/k/v, Qwen2-MoE's shared expert
FAMILIES = {
    "mixtral": {"sliding_window": None},
    "qwen3_moe": {"mlp_only_layers": [0], "norm_topk_prob": True},
    "olmoe": {"clip_qkv": 0.5},
    "qwen2_moe": {"qkv_bias": True},
}
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model = build_random_model(request.param, **FAMILIES[request.param])
    fast, why = FastDecode.recognise(model)
    assert fast is not None, why
    return model, fast


def _prefill(model, prompts):
    ids, mask, positions = left_pad(prompts, 0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1)
    mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return out.past_key_values, nxt, positions[:, -1] + 1, mask


@requires_extension
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference_and_transformers(family, rows, threads):
    model, fast = family
    cache, nxt, positions, mask = _prefill(model, PROMPTS[:rows])
    hf_cache = copy.deepcopy(cache)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            buffers = None
            for _ in range(2):  # the second step reads the buffers the first one wrote
                buffers, logits = fast.step(buffers, cache, nxt, positions, mask, 4)
                kv = [t.clone() for t in buffers.tensors]
                tensors = fast._tensors()
                split = len(SLOTS) * len(cache.layers)
                # the reference recomputes the same column from the state before the op wrote it
                column = mask.shape[1] - 1
                for t in kv:
                    t[:, :, column] = 0
                ref = decode_step_reference(
                    nxt, positions, mask, kv, tensors[:split], *tensors[split:], fast.settings
                )
                hf = model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=positions[:, None],
                    past_key_values=hf_cache,
                    use_cache=True,
                ).logits[:, -1]
                torch.testing.assert_close(logits, ref, **TOL)
                torch.testing.assert_close(logits, hf, **TOL)
                for mine, theirs in zip(buffers.tensors, kv):
                    torch.testing.assert_close(mine[:, :, column], theirs[:, :, column], **TOL)
                for i, layer in enumerate(hf_cache.layers):
                    torch.testing.assert_close(cache.layers[i].keys, layer.keys, **TOL)
                    torch.testing.assert_close(cache.layers[i].values, layer.values, **TOL)
                nxt = logits.argmax(-1)
                positions = positions + 1
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
    finally:
        torch.set_num_threads(before)


@requires_extension
def test_rows_and_threads_do_not_change_results(family):
    """On the same cache, a row's logits are bit-identical alone (no padding) and in a left-padded
    batch, at 1 and at 2 threads."""
    model, fast = family
    prefilled = _prefill(model, PROMPTS)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cache, nxt, positions, mask = copy.deepcopy(prefilled)
            with torch.no_grad():
                batch = fast.step(None, cache, nxt, positions, mask, 1)[1]
                results.append(batch)
                for row, prompt in enumerate(PROMPTS):  # the row alone, on its columns of the cache
                    alone = copy.deepcopy(prefilled[0])
                    alone.batch_select_indices(torch.tensor([row]))
                    for layer in alone.layers:
                        layer.keys = layer.keys[:, :, -len(prompt) :]
                        layer.values = layer.values[:, :, -len(prompt) :]
                    ones = mask.new_ones(1, len(prompt) + 1)
                    got = fast.step(None, alone, nxt[row : row + 1], positions[row : row + 1], ones, 1)[1]
                    assert torch.equal(got[0], batch[row])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


@requires_extension
def test_checks_its_inputs(family):
    model, fast = family
    cache, nxt, positions, mask = _prefill(model, PROMPTS[:1])
    with torch.no_grad():
        buffers, _ = fast.step(None, cache, nxt, positions, mask, 1)
    tensors = fast._tensors()
    split = len(SLOTS) * len(cache.layers)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        decode_step(
            nxt + 10**6, positions, mask, buffers.tensors, tensors[:split], *tensors[split:], fast.settings
        )
    with pytest.raises(RuntimeError, match="kv buffers"):
        decode_step(
            nxt,
            positions,
            torch.ones(1, 100, dtype=torch.long),
            buffers.tensors,
            tensors[:split],
            *tensors[split:],
            fast.settings,
        )


def _prompt_rows(mask: torch.Tensor, start: int = 0):
    """One op row per real token of ``mask [B, S]``'s columns from ``start``: ids index, slots, causal mask."""
    valid = mask.bool()
    seq, col = valid.nonzero(as_tuple=True)
    keep = col >= start
    seq, col = seq[keep], col[keep]
    length = mask.shape[1]
    rows_mask = valid[seq] & torch.ones(length, length, dtype=torch.bool).tril()[col]
    return seq, col, rows_mask


@requires_extension
@pytest.mark.parametrize("threads", [1, 2])
def test_prompt_matches_reference_and_transformers(family, threads):
    """A left-padded prompt batch through the op, one row per real token: each sequence's last logits
    and every real cache column equal the model's own prefill and the reference (TOL)."""
    model, fast = family
    ids, mask, positions = left_pad(PROMPTS, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            hf = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            cache = fast.prompt_cache()
            buffers, logits = fast.prompt(cache, ids, mask, positions, 3)
            seq, col, rows_mask = _prompt_rows(mask)
            last = mask.sum(1).cumsum(0) - 1
            kv = [torch.zeros_like(t) for t in buffers.tensors]
            tensors = fast._tensors()
            split = len(SLOTS) * len(cache.layers)
            ref = decode_step_reference(
                ids[seq, col],
                positions[seq, col],
                rows_mask,
                kv,
                tensors[:split],
                *tensors[split:],
                fast.settings,
                slots=torch.stack((seq, col), 1),
                logit_rows=last,
            )
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(logits, hf.logits[:, -1], **TOL)
    torch.testing.assert_close(logits, ref, **TOL)
    real = mask.bool()[:, None, :, None]
    for mine, theirs in zip(cache.layers, hf.past_key_values.layers):
        assert mine.keys.shape == theirs.keys.shape and mine.keys.data_ptr() in {
            t.data_ptr() for t in buffers.tensors
        }
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            torch.testing.assert_close(a * real, b * real, **TOL)
            assert not a[~real.expand_as(a)].any()  # padding columns: zeros
    for mine, theirs in zip(buffers.tensors, kv):
        torch.testing.assert_close(mine[:, :, : ids.shape[1]], theirs[:, :, : ids.shape[1]], **TOL)


@requires_extension
def test_prompt_in_two_pieces_equals_the_whole(family):
    """The op's slots over a cache that already holds the prompt's first part: the second part's rows
    attend to it and to each other causally, and the last logits equal one whole-prompt call."""
    model, fast = family
    ids, mask, positions = left_pad(PROMPTS, 0)
    with torch.no_grad():
        whole = fast.prompt(fast.prompt_cache(), ids, mask, positions, 0)[1]
        tensors = fast._tensors()
        split = len(SLOTS) * len(model.model.layers)
        args = (tensors[:split], *tensors[split:], fast.settings)
        shape = (len(PROMPTS), fast.settings.num_kv_heads, ids.shape[1], fast.settings.head_dim)
        kv = [torch.zeros(shape) for _ in range(2 * len(model.model.layers))]
        cut = 4
        seq, col, rows_mask = _prompt_rows(mask[:, :cut])
        decode_step(
            ids[seq, col], positions[seq, col], rows_mask, kv, *args, slots=torch.stack((seq, col), 1)
        )
        seq, col, rows_mask = _prompt_rows(mask, start=cut)
        last = torch.tensor([int((seq == b).nonzero().max()) for b in range(len(PROMPTS))])
        pieces = decode_step(
            ids[seq, col],
            positions[seq, col],
            rows_mask,
            kv,
            *args,
            slots=torch.stack((seq, col), 1),
            logit_rows=last,
        )
    torch.testing.assert_close(pieces, whole, **TOL)


@requires_extension
def test_prompt_checks_slots_and_logit_rows(family):
    model, fast = family
    ids, mask, positions = left_pad(PROMPTS[:1], 0)
    with torch.no_grad():
        buffers = fast.prompt(fast.prompt_cache(), ids, mask, positions, 0)[0]
    tensors = fast._tensors()
    split = len(SLOTS) * len(model.model.layers)
    args = (buffers.tensors, tensors[:split], *tensors[split:], fast.settings)
    seq, col, rows_mask = _prompt_rows(mask)
    with pytest.raises(RuntimeError, match="outside the kv rows"):
        decode_step(
            ids[seq, col], positions[seq, col], rows_mask, *args, slots=torch.stack((seq + 1, col), 1)
        )
    with pytest.raises(RuntimeError, match="logit row"):
        decode_step(
            ids[seq, col], positions[seq, col], rows_mask, *args, slots=torch.stack((seq, col), 1),
            logit_rows=torch.tensor([len(seq)]),
        )  # fmt: skip


@requires_extension
@pytest.mark.parametrize("prompt", [False, True])
def test_opcheck(family, prompt):
    """The fake kernel's shapes against the op's, for a decode step and for a prompt's rows with
    slots and logit rows."""
    model, fast = family
    ids, mask, positions = left_pad(PROMPTS[:2], 0)
    shape = (2, fast.settings.num_kv_heads, ids.shape[1] + 1, fast.settings.head_dim)
    kv = [torch.zeros(shape) for _ in range(2 * len(model.model.layers))]
    tensors = fast._tensors()
    split = len(SLOTS) * len(model.model.layers)
    if prompt:
        seq, col, rows_mask = _prompt_rows(mask)
        args = (ids[seq, col], positions[seq, col], rows_mask.long())
        extra = (torch.stack((seq, col), 1), mask.sum(1).cumsum(0) - 1)
    else:
        args = (ids[:, -1], positions[:, -1] + 1, torch.cat([mask, mask.new_ones(2, 1)], 1))
        extra = ()
    torch.library.opcheck(
        torch.ops.moe_runtime.decode_step.default,
        (*args, kv, tensors[:split], *tensors[split:], *fast.settings.op_args(), *extra),
        test_utils=("test_faketensor",),  # test_schema feeds garbage ids
    )


_ISA_PROMPT = """
import torch
from moe_runtime.runtime.fast_decode import FastDecode
from moe_runtime.runtime.generation import left_pad
from moe_runtime.testing import build_random_model
model = build_random_model("qwen2_moe", qkv_bias=True)
fast = FastDecode.of(model)
ids, mask, positions = left_pad([[5, 6, 7, 8, 9, 10, 11], [3, 4, 12]], 0)
with torch.no_grad():
    hf = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    buffers, logits = fast.prompt(fast.prompt_cache(), ids, mask, positions, 2)
torch.testing.assert_close(logits, hf, atol=2e-5, rtol=1e-4)
print("ok")
"""


@requires_extension
@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_prompt_with_narrower_instruction_sets(isa):
    """A prompt batch through the op with the AVX2 or plain kernels (``MOE_RUNTIME_CPU_ISA``, read once
    per process: a subprocess) gives the model's own logits (TOL)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MOE_RUNTIME_CPU_ISA": isa}
    done = subprocess.run(
        [sys.executable, "-c", _ISA_PROMPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
