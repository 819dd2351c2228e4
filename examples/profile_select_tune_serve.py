"""The main job end to end with the Python API: profile a task's routing, select its experts, tune
an ESFT adapter on exactly those, and serve it beside the base model.

    python examples/profile_select_tune_serve.py                      # task 'compare', 300 steps (~1 min)
    python examples/profile_select_tune_serve.py --task field --steps 500 --workdir /tmp/ex
    python examples/profile_select_tune_serve.py --steps 2 --max-tokens 512 --prompts 2   # a smoke run

The same steps on the command line: ``moe-runtime profile``, ``select``, ``tune --method esft``,
then ``generate`` or ``serve`` (the last line this script prints).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import transformers

from moe_runtime.data import read_examples
from moe_runtime.demo.tasks import HEADROOM_TASKS, TASK_RECIPE, write_tasks
from moe_runtime.io import atomic_write_json
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer, pad_token_id
from moe_runtime.profiler import ProfileConfig, expert_config, profile_model, select_experts, write_profile
from moe_runtime.profiler.store import esft_summary
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.tuning import TrainConfig, TuneJob, get
from moe_runtime.tuning.data import encode_examples
from moe_runtime.tuning.esft import ESFTConfig, read_expert_config
from moe_runtime.tuning.evaluate import answer_matches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--task", default="compare", choices=HEADROOM_TASKS, help="demo task (default compare)"
    )
    parser.add_argument(
        "--workdir", default="example-workdir", help="outputs go here (default ./example-workdir)"
    )
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens profiled (default 8192)")
    parser.add_argument("--steps", type=int, default=300, help="ESFT steps (default 300)")
    parser.add_argument("--prompts", type=int, default=50, help="held-out prompts served (default 50)")
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()
    workdir, task = Path(args.workdir), args.task

    # 0. the embedded demo model and its held-out task files
    files = write_tasks(workdir / "tasks", n_train=max(64, args.steps * 4), n_test=args.prompts)
    model, tokenizer = load_model("demo", dtype="float32"), load_tokenizer("demo")
    train = read_examples(files[f"{task}_train"])

    # 1. profile: which experts does the task route to, per layer?
    meta, profiles = profile_model(
        model, tokenizer, {task: train}, ProfileConfig(max_tokens=args.max_tokens, progress=False)
    )
    meta.model = "demo"
    write_profile(workdir / "profile", meta, profiles, plots=False)
    print(f"1. profiled {profiles[task].tokens:,} tokens of '{task}' -> {workdir / 'profile'}")

    # 2. select: per layer, experts by token-selection score until 20% of the routing mass
    selected = select_experts(esft_summary(profiles[task], meta), "token")
    experts_file = atomic_write_json(workdir / f"{task}_experts.json", expert_config(selected))
    chosen = sum(map(len, selected.values()))
    print(f"2. selected {chosen} of {meta.num_experts * len(meta.layers)} routed experts -> {experts_file}")

    # 3. tune: train exactly those experts (router and everything else frozen)
    adapter_dir = workdir / "adapters" / task
    job = TuneJob(
        model=model,
        info=find_moe_layers(model),
        features=encode_examples(tokenizer, train, 256),
        train=TrainConfig(steps=args.steps, lr=TASK_RECIPE["lr"], batch_size=TASK_RECIPE["batch_size"]),
        out=adapter_dir,
        pad_id=pad_token_id(tokenizer),
        progress=False,
    )
    start = time.perf_counter()
    summary = get("esft").tune(job, ESFTConfig(experts=read_expert_config(experts_file)))
    print(
        f"3. tuned {summary['trainable_params']:,} parameters for {args.steps} steps in "
        f"{time.perf_counter() - start:.0f} s, loss {summary['first_logged_loss']:.3f} -> "
        f"{summary['last_logged_loss']:.3f} -> {adapter_dir}"
    )

    # 4. serve: base model and adapter in the same batches, one engine
    engine = MultiAdapterEngine.from_pretrained("demo")
    engine.add_adapter(task, adapter_dir)
    test = read_examples(files[f"{task}_test"])[: args.prompts]
    requests = [Request(ex.prompt, adapter=a, id=(a, i)) for i, ex in enumerate(test) for a in (None, task)]
    done = engine.generate(requests, DecodeConfig(max_new_tokens=16))
    score = {None: 0, task: 0}
    for completion in done:
        adapter, i = completion.id
        score[adapter] += answer_matches(completion.completion, test[i].response)
    print(
        f"4. served {len(requests)} requests: exact match {score[None] / len(test):.0%} base, "
        f"{score[task] / len(test):.0%} with the '{task}' adapter ({len(test)} held-out prompts)"
    )
    example = test[0]
    answer = next(c.completion for c in done if c.id == (task, 0))
    print(f"   {example.prompt!r} -> {answer.splitlines()[0] if answer.strip() else answer!r}")
    engine.close()
    print(f"over HTTP: moe-runtime serve --model demo --adapter {task}={adapter_dir}")


if __name__ == "__main__":
    main()
