"""``bench esft-quality``: the ESFT paper's claim at small scale, on the embedded model.

Per held-out task: profile its training data, select experts (gate p=0.1, token p=0.2), then train
``full``, ``lora``, ``esft_gate``, ``esft_token``, ``routed_lora`` (perft-r, 4 LoRA experts of
rank 8 per layer, top-2), ``mola`` and ``dynmole`` (routed-LoRA variants, defaults) with the same data, steps, batch and seed, and
measure the task score (exact match of greedy answers on the test split, and test loss) and
forgetting (loss increase on the general held-out set).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..data import read_examples
from ..models import find_moe_layers, load_model, load_tokenizer, pad_token_id
from ..profiler import ProfileConfig, profile_model, select_experts
from ..profiler.store import esft_summary
from ..tuning.data import encode_examples
from ..tuning.esft import ExpertSelection, tune_esft
from ..tuning.evaluate import exact_match, mean_token_loss
from ..tuning.full import tune_full
from ..tuning.lora import tune_lora
from ..tuning.registry import TuneJob
from ..tuning.routed_lora import RoutedLoraSettings, tune_routed_lora
from ..tuning.trainer import TrainConfig

__all__ = ["QualitySettings", "bench_esft_quality", "METHODS"]

METHODS = ("full", "lora", "esft_gate", "esft_token", "routed_lora", "mola", "dynmole")
ROUTED_VARIANTS = {"routed_lora": "perft-r", "mola": "mola", "dynmole": "dynmole"}


@dataclass
class QualitySettings:
    """The training recipe shared by every method (learning rates per method)."""

    steps: int = 300
    batch_size: int = 16
    seed: int = 0
    lr: dict[str, float] = field(
        default_factory=lambda: {
            "full": 3e-4,
            "lora": 1e-3,
            "esft_gate": 1e-3,
            "esft_token": 1e-3,
            "routed_lora": 1e-3,
            "mola": 1e-3,
            "dynmole": 1e-3,
        }
    )
    profile_tokens: int = 16384
    eval_examples: int = 100


def _selection(summary: dict, score: str) -> ExpertSelection:
    chosen = select_experts(summary, score)
    return ExpertSelection(experts={int(layer): sorted(ids) for layer, ids in chosen.items() if ids})


def bench_esft_quality(
    model_arg: str, tasks: dict[str, tuple[Path, Path]], general: Path, settings: QualitySettings
) -> dict:
    """Train and evaluate every method on every task.

    Args:
        model_arg: ``demo`` or a checkpoint directory.
        tasks: task name -> (train JSONL, test JSONL) with prompt/response examples.
        general: held-out text for forgetting.
        settings: the shared recipe.

    Returns:
        Per method: ``task_score`` (mean exact match), ``task_loss``, ``general_loss_increase``,
        ``trainable_params``, ``adapter_bytes`` (means over tasks), plus per-task rows and the base scores.
    """
    tokenizer = load_tokenizer(model_arg)
    general_examples = read_examples(general)
    base = load_model(model_arg, dtype="float32")
    base_general = mean_token_loss(base, tokenizer, general_examples)[0]
    rows: dict[str, dict[str, dict]] = {m: {} for m in METHODS}
    base_rows: dict[str, dict] = {}
    pad = pad_token_id(tokenizer)
    bar = tqdm(total=len(tasks) * len(METHODS), desc="esft-quality", unit="run")
    with tempfile.TemporaryDirectory() as tmp:
        for task, (train_path, test_path) in tasks.items():
            train = read_examples(train_path)
            test = read_examples(test_path)[: settings.eval_examples]
            base_rows[task] = {
                "task_score": exact_match(base, tokenizer, test)[0],
                "task_loss": mean_token_loss(base, tokenizer, test)[0],
            }
            meta, profiles = profile_model(
                base,
                tokenizer,
                {task: train},
                ProfileConfig(max_tokens=settings.profile_tokens, progress=False),
            )
            summary = esft_summary(profiles[task], meta)
            features = encode_examples(tokenizer, train, 256, where=str(train_path))
            for method in METHODS:
                model = load_model(model_arg, dtype="float32")
                info = find_moe_layers(model)
                config = TrainConfig(
                    steps=settings.steps,
                    lr=settings.lr[method],
                    batch_size=settings.batch_size,
                    seed=settings.seed,
                )
                out = Path(tmp) / f"{task}_{method}"
                job = TuneJob(model, info, features, config, out=out, pad_id=pad, work_dir=Path(tmp) / "work")
                job.progress = False
                if method.startswith("esft"):
                    selection = _selection(summary, method.removeprefix("esft_"))
                    result = tune_esft(job, selection)
                    result["experts"] = selection.num_experts
                    model = _with_adapter(model_arg, out)  # the saved adapter, merged into a fresh base
                elif method == "full":
                    result = tune_full(job)
                elif method in ROUTED_VARIANTS:
                    routed = RoutedLoraSettings(variant=ROUTED_VARIANTS[method])  # the variant's defaults
                    result = tune_routed_lora(job, routed)
                    model = _with_adapter(model_arg, out)
                else:
                    result = tune_lora(job)
                    model = _with_adapter(model_arg, out)
                model.eval()
                score = exact_match(model, tokenizer, test)[0]
                rows[method][task] = {
                    "task_score": score,
                    "task_loss": mean_token_loss(model, tokenizer, test)[0],
                    "general_loss": (g := mean_token_loss(model, tokenizer, general_examples)[0]),
                    "general_loss_increase": g - base_general,
                    "trainable_params": result["trainable_params"],
                    "adapter_bytes": result["adapter_bytes"],
                    "train_loss": result.get("train_loss"),
                    **({"experts": result["experts"]} if "experts" in result else {}),
                }
                bar.update()
    bar.close()
    out = {
        "settings": {**settings.__dict__},
        "base": {"general_loss": base_general, "tasks": base_rows},
        "per_task": rows,
    }
    for method in METHODS:
        per = rows[method].values()
        out[method] = {
            key: statistics.mean(row[key] for row in per)
            for key in (
                "task_score",
                "task_loss",
                "general_loss_increase",
                "trainable_params",
                "adapter_bytes",
            )
        }
    full = out["full"]
    for method in ("esft_gate", "esft_token", *ROUTED_VARIANTS):
        out[method]["score_vs_full"] = (
            out[method]["task_score"] / full["task_score"] if full["task_score"] else None
        )
        inc = full["general_loss_increase"]
        out[method]["forgetting_vs_full"] = out[method]["general_loss_increase"] / inc if inc > 0 else None
    return out


def _with_adapter(model_arg: str, out: Path):
    """A fresh base model with the adapter saved at ``out`` applied through the checked loading path."""
    from ..tuning import apply_adapter

    return apply_adapter(load_model(model_arg, dtype="float32"), out)
