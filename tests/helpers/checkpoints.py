"""Small random MoE checkpoints with a tokenizer, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing matches "
    "def return for in range print sum of 12 + 35 = 47 key value name city oslo lima "
).split()


def make_tokenizer(directory: Path):
    """A small byte-level BPE tokenizer saved as a standard transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def save_checkpoint(
    directory: Path, model_type: str, *, dtype=torch.float64, seed: int = 0, **overrides
) -> Path:
    from moe_runtime.testing import build_random_model

    tokenizer = make_tokenizer(directory)
    model = build_random_model(model_type, seed=seed, dtype=dtype, vocab_size=len(tokenizer), **overrides)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    return directory


def damaged_copy(src: Path, dst: Path, damage: str) -> tuple[Path, str]:
    """Copy checkpoint ``src`` to ``dst`` with its second shard ``"missing"`` or ``"truncated"`` (100
    bytes cut); returns the copy and the damaged shard's name."""
    import shutil

    shutil.copytree(src, dst)
    shard = sorted(Path(dst).glob("*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    return Path(dst), shard.name
