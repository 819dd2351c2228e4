"""Held-out task sets bundled with the demo model.

Everything here is drawn from the held-out partition of `corpus` (see `corpus.is_held_out`), so no
example appears in the pretraining corpus. Written by `write_tasks`:

- `<task>_train.jsonl`, `<task>_test.jsonl` for every tuning task in `TASKS`:
  `{"prompt": ..., "response": ...}` with an exact-match answer. Score a greedy completion by cutting
  it at the first newline (or end of text) and comparing with `response`. Train and test are disjoint.
- `<domain>.jsonl` for every domain: held-out `{"text": ...}` documents, for profiling routing.
- `general.jsonl`: held-out `{"text": ...}` documents of all domains, for measuring forgetting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from moe_runtime.demo.corpus import (
    DOMAINS,
    arith_addition,
    cipher_phrase,
    code_unit,
    domain_rng,
    generate_document,
    is_held_out,
    kv_lookup,
    kv_record,
    sort_list,
)

__all__ = [
    "CONTINUATION_TASKS",
    "DEMO_TASKS",
    "HEADROOM_TASKS",
    "TASKS",
    "TASK_DOMAINS",
    "TASK_RECIPE",
    "domain_texts",
    "general_texts",
    "task_examples",
    "write_tasks",
]

CONTINUATION_TASKS: tuple[str, ...] = ("arith", "kv", "cipher", "sort")
"""Tasks in the pretraining format itself (the model continues a familiar pattern)."""

HEADROOM_TASKS: tuple[str, ...] = ("compare", "maximum", "field", "kind")
"""Narrow skills in a format never seen in pretraining, built on one domain's content: the base model
scores near 0% on them and a brief ESFT run on that domain's experts learns them (docs/demo_model.md)."""

TASKS: tuple[str, ...] = CONTINUATION_TASKS + HEADROOM_TASKS

DEMO_TASKS: tuple[str, ...] = ("compare", "field")
"""The two tasks `moe-runtime demo` tunes adapters for."""

TASK_DOMAINS: dict[str, str] = {
    "arith": "arith",
    "kv": "kv",
    "cipher": "cipher",
    "sort": "sort",
    "compare": "arith",
    "maximum": "sort",
    "field": "kv",
    "kind": "code",
}
"""The pretraining domain whose content each task is made of."""

TASK_RECIPE: dict = {"lr": 5e-4, "batch_size": 16, "steps": 800}
"""ESFT hyper-parameters the demo (and `bench esft-quality`'s ESFT methods) use for the headroom tasks.

Chosen on `bench esft-quality` (3 seeds, docs/benchmarks.md): a small lr over more steps keeps 0.97x
full fine-tuning's task score and forgets 0.38x its general loss; 1.5e-3 x 450 steps learned as much
but forgot 0.83x."""

Example = tuple[str, str, str]
"""(partition key, prompt, response)."""


def _arith(rng) -> Example:
    key, text = arith_addition(rng)
    prompt, answer = text.split("=")
    return key, prompt + "=", answer


def _kv(rng) -> Example:
    prompt, answer = kv_lookup(rng, rng.randrange(3, 6))
    return f"{prompt} {answer}", prompt, " " + answer


def _cipher(rng) -> Example:
    plain, ciphered = cipher_phrase(rng)
    return plain, f"plain: {plain} => cipher:", " " + ciphered


def _sort(rng) -> Example:
    xs = sort_list(rng)
    key = " ".join(map(str, xs))
    return key, f"sort: {key} ->", " " + " ".join(map(str, sorted(xs)))


def _compare(rng) -> Example:
    """Which of two numbers is larger: `cmp 37 480 =` -> ` <` (arith content, a new format)."""
    a, b = rng.sample(range(10, 1000), 2)
    return f"{a}?{b}", f"cmp {a} {b} =", " <" if a < b else " >"


def _maximum(rng) -> Example:
    """The largest number of a list: `max: 42 7 19 ->` -> ` 42` (sort content, a new format)."""
    xs = sort_list(rng)
    key = " ".join(map(str, xs))
    return key, f"max: {key} ->", f" {max(xs)}"


def _field(rng) -> Example:
    """Which field of a record holds a value: `...\nfield of oslo:` -> ` city` (kv content, a new format)."""
    record = kv_record(rng, rng.randrange(1000, 10000))
    line = " ".join(f"{k}={v}" for k, v in record.items())
    name = rng.choice(("name", "city", "age", "job"))
    return f"{line}:{name}", f"{line}\nfield of {record[name]}:", f" {name}"


def _kind(rng) -> Example:
    """What a function computes: `def ...\n# kind:` -> ` sum`, ` filter`, ` map` or ` min` (code content)."""
    key, text = code_unit(rng)
    if "len(" in text:
        kind = "min"
    elif ".append(" in text:
        kind = "filter"
    elif "= 0" in text:
        kind = "sum"
    else:
        kind = "map"
    return key, f"{text}\n# kind:", f" {kind}"


_MAKERS: dict[str, Callable] = {
    "arith": _arith,
    "kv": _kv,
    "cipher": _cipher,
    "sort": _sort,
    "compare": _compare,
    "maximum": _maximum,
    "field": _field,
    "kind": _kind,
}


def task_examples(
    task: str, *, seed: int = 0, n_train: int = 2000, n_test: int = 200
) -> dict[str, list[dict]]:
    """Held-out prompt/response examples of one task, split into disjoint train and test sets.

    Args:
        task: One of `TASKS`.
        seed: Seed of the generating streams.
        n_train: Number of training examples.
        n_test: Number of test examples.

    Returns:
        `{"train": [...], "test": [...]}`, each a list of `{"prompt", "response"}` dicts.
    """
    make = _MAKERS[task]
    rng = domain_rng(seed, f"task:{task}")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {"test": [], "train": []}
    for split, n in (("test", n_test), ("train", n_train)):
        while len(out[split]) < n:
            key, prompt, response = make(rng)
            if key in seen or not is_held_out(f"{TASK_DOMAINS[task]}:{key}"):
                continue
            seen.add(key)
            out[split].append({"prompt": prompt, "response": response})
    return out


def domain_texts(domain: str, n: int, *, seed: int = 0, stream: str = "profile") -> list[str]:
    """`n` held-out documents of `domain`, distinct from each other."""
    rng = domain_rng(seed, f"{domain}:{stream}")
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < n:
        text = generate_document(domain, rng, held_out=True)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def general_texts(n_per_domain: int, *, seed: int = 0) -> list[str]:
    """Held-out documents of every domain, interleaved (the forgetting set)."""
    per_domain = [domain_texts(d, n_per_domain, seed=seed, stream="general") for d in DOMAINS]
    return [texts[i] for i in range(n_per_domain) for texts in per_domain]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_tasks(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 200,
    n_text: int = 200,
    n_general_per_domain: int = 50,
) -> dict[str, Path]:
    """Write every task file into `out_dir` (created if needed); deterministic for a seed.

    Args:
        out_dir: Target directory.
        seed: Seed of the generating streams.
        n_train: Training examples per task.
        n_test: Test examples per task.
        n_text: Held-out documents per domain in `<domain>.jsonl`.
        n_general_per_domain: Documents per domain in `general.jsonl`.

    Returns:
        File name stem (`arith_train`, `arith_test`, ..., `prose`, ..., `general`) -> path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for task in TASKS:
        splits = task_examples(task, seed=seed, n_train=n_train, n_test=n_test)
        for split, rows in splits.items():
            paths[f"{task}_{split}"] = _write_jsonl(out_dir / f"{task}_{split}.jsonl", rows)
    for domain in DOMAINS:
        rows = [{"text": t} for t in domain_texts(domain, n_text, seed=seed)]
        paths[domain] = _write_jsonl(out_dir / f"{domain}.jsonl", rows)
    rows = [{"text": t} for t in general_texts(n_general_per_domain, seed=seed)]
    paths["general"] = _write_jsonl(out_dir / "general.jsonl", rows)
    return dict(sorted(paths.items()))
