"""The demo model's tokenizer: byte-level BPE trained with `tokenizers` on the generated corpus.

Digits are split into single tokens before BPE (so `arith` and `sort` see one token per digit),
then the usual GPT-2 byte-level pre-tokenization applies. `<|endoftext|>` (id 0) is both the
end-of-text and the padding token; `tokenizer(text)` adds no special tokens, so it returns
exactly the text's tokens. Saved with `save_pretrained`, it loads with plain
`AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (deterministic for the same input).

    Args:
        texts: Training documents, in a fixed order.
        vocab_size: Final vocabulary size, special token and 256 byte symbols included.

    Returns:
        A `PreTrainedTokenizerFast` with `eos_token == pad_token == "<|endoftext|>"` (id 0).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
