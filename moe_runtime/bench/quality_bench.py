"""``bench esft-quality``: the ESFT paper's claim at small scale, on the embedded model.

Per held-out task and seed: profile the task's training data, select experts (gate p=0.1, token
p=0.2), then train every method in ``METHODS`` with the same data, steps, batch and seed:

- ``full``: every weight; ``lora``: LoRA on attention and experts;
- ``esft_gate`` / ``esft_token``: the selected experts only (ESFT);
- ``routed_lora``: perft-r, 4 LoRA experts of rank 8 per layer, top-2, beside the frozen MoE;
- ``esft_lora``: LoRA inside the token-selected experts only;
- ``mola`` / ``dynmole``: the routed-LoRA variants MoLA (more LoRA experts in higher layers) and
  DynMoLE (Tsallis-entropy hybrid routing), their defaults.

Measured per run: the task score (exact match of greedy answers on the test split) and test loss,
and forgetting twice: the loss increase on the general held-out set, and the exact-match drop on the
other domains' continuation tasks (tasks of a different pretraining domain than the tuned one).
Means and spreads are over seeds of the task-averaged figures.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..data import read_examples
from ..demo.tasks import TASK_RECIPE
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

__all__ = ["METHODS", "QualitySettings", "bench_esft_quality"]


@dataclass
class QualitySettings:
    """The training recipe shared by every method (learning rates per method)."""

    steps: int = TASK_RECIPE["steps"]
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: dict[str, float] = field(
        default_factory=lambda: {
            "full": 3e-4,
            "lora": 1e-3,
            "esft_gate": TASK_RECIPE["lr"],
            "esft_token": TASK_RECIPE["lr"],
            "routed_lora": 1e-3,
            "esft_lora": 3e-3,
            "mola": 1e-3,
            "dynmole": 1e-3,
        }
    )
    profile_tokens: int = 16384
    eval_examples: int = 100
    other_examples: int = 50
    methods: tuple[str, ...] = ()
    """Methods to run (empty: all of :data:`METHODS`); ``full`` is the reference of the ratios."""

    def chosen(self) -> tuple[str, ...]:
        """The methods this run trains, in :data:`METHODS` order."""
        return tuple(m for m in METHODS if not self.methods or m in self.methods)


Trainer = Callable[[TuneJob, dict], dict]
"""``(job, esft_summary) -> result`` of one method's training."""


def _selection(summary: dict, score: str) -> ExpertSelection:
    chosen = select_experts(summary, score)
    return ExpertSelection(experts={int(layer): sorted(ids) for layer, ids in chosen.items() if ids})


def _esft(score: str) -> Trainer:
    def run(job: TuneJob, summary: dict) -> dict:
        selection = _selection(summary, score)
        return {**tune_esft(job, selection), "experts": selection.num_experts}

    return run


def _routed(variant: str) -> Trainer:
    def run(job: TuneJob, summary: dict) -> dict:
        experts = _selection(summary, "token") if variant == "esft-lora" else None
        return tune_routed_lora(job, RoutedLoraSettings(variant=variant, experts=experts))

    return run


TRAINERS: dict[str, Trainer] = {
    "full": lambda job, summary: tune_full(job),
    "lora": lambda job, summary: tune_lora(job),
    "esft_gate": _esft("gate"),
    "esft_token": _esft("token"),
    "routed_lora": _routed("perft-r"),
    "esft_lora": _routed("esft-lora"),
    "mola": _routed("mola"),
    "dynmole": _routed("dynmole"),
}
METHODS = tuple(TRAINERS)
MERGED_IN_PLACE = {"full"}
"""Methods whose trained model is evaluated as is; the others through their saved adapter."""


def bench_esft_quality(
    model_arg: str,
    tasks: dict[str, tuple[Path, Path]],
    general: Path,
    settings: QualitySettings,
    *,
    other_tasks: dict[str, dict[str, Path]] | None = None,
) -> dict:
    """Train and evaluate every method on every task, for every seed.

    Args:
        model_arg: ``demo`` or a checkpoint directory.
        tasks: task name -> (train JSONL, test JSONL) with prompt/response examples.
        general: held-out text for forgetting (loss).
        settings: the shared recipe.
        other_tasks: per tuned task, the other domains' task name -> test JSONL, whose exact-match drop
            is the second forgetting figure (none: that figure is left out).

    Returns:
        Per method: ``task_score``, ``task_loss``, ``general_loss_increase``, ``other_task_drop``,
        ``trainable_params``, ``adapter_bytes`` (means over seeds of task means), ``*_spread``
        (``[min, max]`` over seeds), plus per-run rows and the base scores.
    """
    other_tasks = other_tasks or {}
    tokenizer = load_tokenizer(model_arg)
    general_examples = read_examples(general)
    others = {
        name: read_examples(path)[: settings.other_examples]
        for per_task in other_tasks.values()
        for name, path in per_task.items()
    }
    base = load_model(model_arg, dtype="float32")
    base_general = mean_token_loss(base, tokenizer, general_examples)[0]
    base_other = {name: exact_match(base, tokenizer, examples)[0] for name, examples in others.items()}
    pad = pad_token_id(tokenizer)
    runs: list[dict] = []
    base_rows: dict[str, dict] = {}
    methods = settings.chosen()
    bar = tqdm(total=len(tasks) * len(methods) * len(settings.seeds), desc="esft-quality", unit="run")
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
            for seed in settings.seeds:
                for method in methods:
                    trainer = TRAINERS[method]
                    model = load_model(model_arg, dtype="float32")
                    config = TrainConfig(
                        steps=settings.steps,
                        lr=settings.lr[method],
                        batch_size=settings.batch_size,
                        seed=seed,
                    )
                    out = Path(tmp) / f"{task}_{method}_{seed}"
                    job = TuneJob(
                        model,
                        find_moe_layers(model),
                        features,
                        config,
                        out=out,
                        pad_id=pad,
                        work_dir=Path(tmp) / "work",
                        progress=False,
                    )
                    result = trainer(job, summary)
                    if method not in MERGED_IN_PLACE:
                        model = _with_adapter(model_arg, out)  # the saved adapter on a fresh base
                    model.eval()
                    general_loss = mean_token_loss(model, tokenizer, general_examples)[0]
                    drops = [
                        base_other[name] - exact_match(model, tokenizer, others[name])[0]
                        for name in other_tasks.get(task, {})
                    ]
                    runs.append(
                        {
                            "task": task,
                            "method": method,
                            "seed": seed,
                            "task_score": exact_match(model, tokenizer, test)[0],
                            "task_loss": mean_token_loss(model, tokenizer, test)[0],
                            "general_loss_increase": general_loss - base_general,
                            "other_task_drop": statistics.mean(drops) if drops else None,
                            "trainable_params": result["trainable_params"],
                            "adapter_bytes": result["adapter_bytes"],
                            "train_loss": result.get("train_loss"),
                            **({"experts": result["experts"]} if "experts" in result else {}),
                        }
                    )
                    bar.update()
    bar.close()
    return _summarize(runs, settings, base_general, base_rows, base_other)


_FIGURES = (
    "task_score",
    "task_loss",
    "general_loss_increase",
    "other_task_drop",
    "trainable_params",
    "adapter_bytes",
)


def _summarize(runs: list[dict], settings: QualitySettings, base_general, base_rows, base_other) -> dict:
    """Means over seeds of the task-averaged figures, their spreads, and ratios against ``full`` per seed."""
    out: dict = {
        "settings": {**settings.__dict__, "seeds": list(settings.seeds), "methods": list(settings.chosen())},
        "base": {"general_loss": base_general, "tasks": base_rows, "other_tasks": base_other},
        "runs": runs,
    }
    per_seed: dict[str, dict[int, dict]] = {}
    for method in settings.chosen():
        per_seed[method] = {}
        for seed in settings.seeds:
            rows = [r for r in runs if r["method"] == method and r["seed"] == seed]
            per_seed[method][seed] = {
                key: statistics.mean(r[key] for r in rows) if all(r[key] is not None for r in rows) else None
                for key in _FIGURES
            }
        entry: dict = {}
        for key in _FIGURES:
            values = [per_seed[method][s][key] for s in settings.seeds]
            if any(v is None for v in values):
                continue
            entry[key] = statistics.mean(values)
            if key not in ("trainable_params", "adapter_bytes"):
                entry[f"{key}_spread"] = [min(values), max(values)]
        out[method] = entry
    for method in settings.chosen():
        if method == "full" or "full" not in per_seed:
            continue
        scores, forgetting = [], []
        for seed in settings.seeds:
            full, mine = per_seed["full"][seed], per_seed[method][seed]
            scores.append(mine["task_score"] / full["task_score"] if full["task_score"] else None)
            inc = full["general_loss_increase"]
            forgetting.append(mine["general_loss_increase"] / inc if inc > 0 else None)
        if None not in scores:
            out[method]["score_vs_full"] = statistics.mean(scores)
            out[method]["score_vs_full_min"] = min(scores)
        if None not in forgetting:
            out[method]["forgetting_vs_full"] = statistics.mean(forgetting)
            out[method]["forgetting_vs_full_max"] = max(forgetting)
    return out


def _with_adapter(model_arg: str, out: Path):
    """A fresh base model with the adapter saved at ``out`` applied through the checked loading path."""
    from ..tuning import apply_adapter

    return apply_adapter(load_model(model_arg, dtype="float32"), out)


def format_table(result: dict) -> str:
    """The terminal table: one row per method, means over seeds with their [min, max] spreads."""

    def pct(entry: dict, key: str) -> str:
        lo, hi = entry[f"{key}_spread"]
        return f"{entry[key]:6.1%} [{lo:.0%}-{hi:.0%}]"

    def num(entry: dict, key: str) -> str:
        if key not in entry:
            return "n/a"
        lo, hi = entry[f"{key}_spread"]
        return f"{entry[key]:+.3f} [{lo:+.3f},{hi:+.3f}]"

    header = (
        f"{'method':<12} {'task score':<17} {'vs full (min)':<14} {'general loss +':<25} "
        f"{'other-task EM drop':<25} {'forgetting vs full (max)':<25} {'trainable':>11} {'adapter':>10}"
    )
    lines = [header]
    for method in result["settings"]["methods"]:
        entry = result[method]
        ratio = (
            f"{entry['score_vs_full']:.2f} ({entry['score_vs_full_min']:.2f})"
            if "score_vs_full" in entry
            else ""
        )
        forget = (
            f"{entry['forgetting_vs_full']:.2f} ({entry['forgetting_vs_full_max']:.2f})"
            if "forgetting_vs_full" in entry
            else ""
        )
        lines.append(
            f"{method:<12} {pct(entry, 'task_score'):<17} {ratio:<14} {num(entry, 'general_loss_increase'):<25} "
            f"{num(entry, 'other_task_drop'):<25} {forget:<25} {entry['trainable_params']:>11,.0f} "
            f"{entry['adapter_bytes'] / 1e6:>8.2f}MB"
        )
    base = result["base"]
    scores = ", ".join(f"{t} {row['task_score']:.0%}" for t, row in base["tasks"].items())
    lines.append(f"base model: task score {scores}; general loss {base['general_loss']:.3f}")
    seeds = result["settings"]["seeds"]
    lines.append(f"means over seeds {seeds} of the per-task means; [min, max] over seeds")
    return "\n".join(lines)
