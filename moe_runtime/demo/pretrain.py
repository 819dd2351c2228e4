"""Deterministic build of the demo model: corpus -> tokenizer -> pretraining -> checkpoint.

    python -m moe_runtime.demo.pretrain --out DIR [--seed 0] [--steps 2000]

Pipeline: generate the multi-domain corpus (`corpus.corpus_stream`), train the byte-level BPE
tokenizer on its first documents, pack the token stream (documents separated by `<|endoftext|>`)
into `[steps * batch, seq_len]` rows, shuffle the rows with a seeded generator, and pretrain a
`Qwen2MoeForCausalLM` with AdamW, warmup + cosine schedule and the router load-balancing loss.
Finally measure the held-out loss per domain and write a standard checkpoint plus `build_info.json`.

Reproduction: same seed, steps and config give a bit-identical `model.safetensors` on the same
torch version and thread count (`BuildConfig.threads`, 1 by default, is fixed here); `build_info.json`
records both, with the weights' SHA-256 to compare against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

from moe_runtime.demo.corpus import DOMAINS, corpus_stream
from moe_runtime.demo.tasks import domain_texts
from moe_runtime.demo.tokenizer import train_tokenizer

__all__ = ["BuildConfig", "build", "heldout_loss", "main", "model_config"]


def model_config(*, vocab_size: int = 1024, eos_token_id: int = 0, **overrides: Any) -> Qwen2MoeConfig:
    """The demo architecture: a small fine-grained Qwen2-MoE (64 routed experts of width 32, top-8, 1 shared).

    Args:
        vocab_size: Tokenizer vocabulary size.
        eos_token_id: Id of `<|endoftext|>` (also padding and BOS for generation).
        **overrides: Any `Qwen2MoeConfig` field, e.g. a tiny model for tests.
    """
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 128,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.1,
        "output_router_logits": False,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    fields.update(overrides)
    return Qwen2MoeConfig(**fields)


@dataclass
class BuildConfig:
    """Everything that determines the built checkpoint."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 1024
    tokenizer_docs: int = 20000
    eval_docs: int = 200
    threads: int = 1
    model_overrides: dict[str, Any] = field(default_factory=dict)


def _lr_factor(step: int, cfg: BuildConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _pack(tokenizer: PreTrainedTokenizerFast, cfg: BuildConfig) -> torch.Tensor:
    """Tokenize the corpus stream into `[steps * batch, seq_len]` rows, documents ended by EOS."""
    stream = corpus_stream(cfg.seed)
    need = cfg.steps * cfg.batch_size * cfg.seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    pending = [next(stream)[1] for _ in range(cfg.tokenizer_docs)]
    while len(ids) < need:
        for doc_ids in tokenizer(pending)["input_ids"]:
            ids.extend(doc_ids)
            ids.append(eos)
        pending = [next(stream)[1] for _ in range(5000)]
    rows = torch.tensor(ids[:need], dtype=torch.int64).view(-1, cfg.seq_len)
    return rows


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], *, batch_size: int = 16) -> float:
    """Mean next-token loss over every token of `texts` (each text tokenized as `tokenizer(text)`)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        logits = model(**enc).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((targets != -100).sum())
    return total / max(1, count)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(out: Path, cfg: BuildConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Build the demo checkpoint into `out` (written to a temp dir next to it, then renamed).

    Args:
        out: Target directory; must not exist or be empty.
        cfg: Build settings (defaults: the shipped checkpoint's).
        progress: Show a tqdm progress bar with the loss.

    Returns:
        The `build_info.json` content.
    """
    cfg = cfg or BuildConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    start = time.perf_counter()
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    # The grouped_mm experts' backward scatters through an index; the deterministic kernel fixes its order.
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, cfg, start, progress)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _build(out: Path, cfg: BuildConfig, start: float, progress: bool) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)

    stream = corpus_stream(cfg.seed)
    tokenizer = train_tokenizer(
        (next(stream)[1] for _ in range(cfg.tokenizer_docs)), vocab_size=cfg.vocab_size
    )
    rows = _pack(tokenizer, cfg)
    data_sha256 = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))

    config = model_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **cfg.model_overrides
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, cfg))

    model.train()
    train_start = time.perf_counter()
    smooth = None
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = rows[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
        outputs = model(input_ids=batch, labels=batch, output_router_logits=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        lm_loss = (outputs.loss - config.router_aux_loss_coef * outputs.aux_loss).item()
        smooth = lm_loss if smooth is None else 0.98 * smooth + 0.02 * lm_loss
        bar.set_postfix(loss=f"{smooth:.3f}", aux=f"{outputs.aux_loss.item():.3f}", refresh=False)
    train_time = time.perf_counter() - train_start

    losses = {
        d: round(heldout_loss(model, tokenizer, domain_texts(d, cfg.eval_docs, seed=cfg.seed)), 4)
        for d in DOMAINS
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            do_sample=False,
            max_new_tokens=64,
        ).save_pretrained(tmp)
        info = {
            "command": f"python -m moe_runtime.demo.pretrain --out DIR --seed {cfg.seed} --steps {cfg.steps}",
            "build_config": asdict(cfg),
            "data_sha256": data_sha256,
            "tokens_trained": cfg.steps * cfg.batch_size * cfg.seq_len,
            "num_parameters": n_params,
            "final_train_loss": round(smooth or float("nan"), 4),
            "heldout_loss": losses,
            "uniform_loss": round(math.log(len(tokenizer)), 4),
            "train_time_s": round(train_time, 1),
            "wall_time_s": round(time.perf_counter() - start, 1),
            "model_sha256": _sha256(tmp / "model.safetensors"),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "threads": cfg.threads,
            "python": platform.python_version(),
        }
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the wall time and held-out losses."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_runtime.demo.pretrain",
        description="Rebuild the demo MoE checkpoint deterministically.",
        epilog="example: python -m moe_runtime.demo.pretrain --out /tmp/demo-ckpt --seed 0 --steps 2000",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (must not exist or be empty)"
    )
    parser.add_argument(
        "--seed", type=int, default=BuildConfig.seed, help="seed of corpus, init and data order"
    )
    parser.add_argument("--steps", type=int, default=BuildConfig.steps, help="optimizer steps")
    args = parser.parse_args(argv)
    try:
        info = build(args.out, BuildConfig(seed=args.seed, steps=args.steps))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wall time {info['wall_time_s']:.1f} s (training {info['train_time_s']:.1f} s)")
    print("held-out loss per domain: " + ", ".join(f"{d}={v:.3f}" for d, v in info["heldout_loss"].items()))
    print(f"model sha256 {info['model_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
