"""Tune small ESFT adapters for a few of the demo model's tasks (the other examples serve them).

For each task: profile its routing on the base model, select its experts (token score, p = 0.2), tune
them for ``--steps`` steps, and store the task's routing profile beside the adapter (what ``"auto"``
requests are matched against). Adapters already in ``--out`` are reused.

    python examples/demo_adapters.py                                 # compare, field, kind; 100 steps each
    python examples/demo_adapters.py --tasks arith,kv,cipher,sort,compare,field --steps 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import transformers

from moe_runtime.data import read_examples
from moe_runtime.demo.tasks import TASK_RECIPE, TASKS, write_tasks
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer, pad_token_id
from moe_runtime.profiler import ProfileConfig, profile_model, select_experts
from moe_runtime.profiler.store import esft_summary
from moe_runtime.runtime.profiles import RoutingProfile, write_routing_profile
from moe_runtime.tuning import TrainConfig, TuneJob, get
from moe_runtime.tuning.data import encode_examples
from moe_runtime.tuning.esft import ESFTConfig, ExpertSelection

DEFAULT_TASKS = ("compare", "field", "kind")


def tune_demo_adapters(
    out: Path, tasks=DEFAULT_TASKS, *, steps: int = 100, max_tokens: int = 4096, quiet: bool = False
) -> dict[str, Path]:
    """``{task: adapter directory}`` under ``out``, tuning the ones not there yet."""
    transformers.logging.disable_progress_bar()
    out = Path(out)
    adapters = {task: out / task for task in tasks}
    missing = [t for t, d in adapters.items() if not (d / "routing_profile.json").is_file()]
    if not missing:
        return adapters
    files = write_tasks(out / "tasks", n_train=max(64, steps * TASK_RECIPE["batch_size"]), n_test=50)
    tokenizer = load_tokenizer("demo")
    for task in missing:
        model = load_model("demo", dtype="float32")
        train = read_examples(files[f"{task}_train"])
        meta, profiles = profile_model(
            model, tokenizer, {task: train}, ProfileConfig(max_tokens=max_tokens, progress=False)
        )
        selected = select_experts(esft_summary(profiles[task], meta), "token")
        selection = ExpertSelection(experts={int(layer): ids for layer, ids in selected.items() if ids})
        job = TuneJob(
            model=model,
            info=find_moe_layers(model),
            features=encode_examples(tokenizer, train, 256),
            train=TrainConfig(steps=steps, lr=TASK_RECIPE["lr"], batch_size=TASK_RECIPE["batch_size"]),
            out=adapters[task],
            pad_id=pad_token_id(tokenizer),
            progress=False,
        )
        summary = get("esft").tune(job, ESFTConfig(experts=selection))
        profile = RoutingProfile.from_counts(meta.layers, profiles[task].counts, profiles[task].tokens, task)
        write_routing_profile(adapters[task], profile)  # last: its presence marks a finished adapter
        if not quiet:
            print(
                f"tuned '{task}': {selection.num_experts} experts, {steps} steps, "
                f"loss {summary['first_logged_loss']:.3f} -> {summary['last_logged_loss']:.3f} -> {adapters[task]}",
                flush=True,
            )
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="example-adapters", help="adapter directories go here")
    parser.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of {', '.join(TASKS)}"
    )
    parser.add_argument("--steps", type=int, default=100, help="ESFT steps per adapter (default 100)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task '{unknown[0]}' (tasks: {', '.join(TASKS)})")
    for task, path in tune_demo_adapters(Path(args.out), tasks, steps=args.steps).items():
        print(f"{task}={path}")


if __name__ == "__main__":
    main()
