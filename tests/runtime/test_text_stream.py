"""Streamed text equals the full decode at every step, for byte-level BPE (the demo tokenizer),
SentencePiece-style pieces with byte fallback, and a WordPiece decoder that rewrites across tokens."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from moe_runtime.runtime.scheduler import TextStream, decodes_locally


def _pieces_tokenizer() -> PreTrainedTokenizerFast:
    """Llama's decoder: pieces with "▁" for a space, byte fallback, the first space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁the", "▁a", "b", "▁", ".", ",", "▁日本", "é", "▁x", "y", "'s", "▁▁"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "[CLS]", "hello", "##world", ".", ",", "'", "s", "##s", "a", "!", "n't", "do"]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece(cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]")


@pytest.fixture(scope="module", params=["demo", "pieces", "wordpiece"])
def tokenizer(request):
    if request.param == "demo":
        from moe_runtime.models import load_tokenizer

        return load_tokenizer("demo")
    return _pieces_tokenizer() if request.param == "pieces" else _wordpiece_tokenizer()


def test_only_token_local_decoders_decode_incrementally(tokenizer):
    assert decodes_locally(tokenizer) == (type(tokenizer.backend_tokenizer.decoder) is not decoders.WordPiece)


@pytest.mark.parametrize("stop", [None, ["a", "é"], [", "]])
def test_text_equals_the_full_decode_at_every_step(tokenizer, stop):
    """Random ids (split characters, special tokens, pieces that start with a space): after every
    update the text is the full decode (cut at the first stop string). (What was streamed can differ
    from it where byte fallback decodes a run of bytes again as a whole; real text is covered by
    test_continuous_batching's split-character test.)"""
    rng = random.Random(7)
    for _ in range(12):
        ids, stream, deltas, stopped = [], TextStream(tokenizer, stop), [], False
        for _ in range(rng.randrange(1, 60)):
            ids.append(rng.randrange(len(tokenizer)))
            delta, stopped = stream.update(ids)
            deltas.append(delta)
            full = tokenizer.decode(ids, skip_special_tokens=True)
            cuts = [i for i in (full.find(s) for s in stop or []) if i >= 0]
            assert stream.text == (full[: min(cuts)] if cuts else full)
            assert stopped == bool(cuts)
            if stopped:
                break
        deltas.append(stream.flush())
        assert "".join(deltas) == stream.emitted


def test_a_list_that_is_not_the_one_grown_starts_over(tokenizer):
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    stream = TextStream(tokenizer)
    stream.update(ids)
    other = ids[:2] + ids[::-1]
    stream.update(other)
    assert stream.text == tokenizer.decode(other, skip_special_tokens=True)


def test_generate_decodes_the_text_once_unless_it_stops(monkeypatch):
    """``engine.generate`` hands out no events: its rows decode their text once, at the end (no
    per-step update) unless a stop string must be watched; the text is the full decode either way,
    and a streamed request of the same engine still gets its deltas."""
    from moe_runtime.models import load_tokenizer
    from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
    from moe_runtime.testing import build_random_model

    tokenizer = load_tokenizer("demo")
    model = build_random_model("qwen3_moe", vocab_size=len(tokenizer))
    engine = MultiAdapterEngine(model, tokenizer)
    updates = [0]
    update = TextStream.update

    def counted(self, token_ids):
        updates[0] += 1
        return update(self, token_ids)

    monkeypatch.setattr(TextStream, "update", counted)
    config = DecodeConfig(max_new_tokens=12, stop_on_eos=False)
    done = engine.generate([Request("a b c", max_new_tokens=12)], config)[0]
    assert updates[0] == 0 and done.completion == tokenizer.decode(done.token_ids, skip_special_tokens=True)
    assert len(done.completion) >= 2
    stop = done.completion[len(done.completion) // 2 :][:2]
    cut = engine.generate([Request("a b c", max_new_tokens=12, stop=[stop])], config)[0]
    assert updates[0] > 0 and cut.completion == done.completion[: done.completion.find(stop)]
    updates[0] = 0
    events = list(engine.stream(Request("a b c", max_new_tokens=12), config))
    assert updates[0] == 12 and "".join(e.text for e in events) == done.completion
