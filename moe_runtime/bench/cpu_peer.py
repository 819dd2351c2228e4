"""``bench cpu-peer``: moe-runtime against llama.cpp (through llama-cpp-python) on the same weights, CPU.

    checkpoint   a random float32 Mixtral (hidden 1024, 8 layers, 16 experts top-2, 426M parameters,
                 1.70 GB) with the demo tokenizer, built once into the cache directory (a child process)
    gguf         the same weights as GGUF f32 by llama.cpp's own ``convert_hf_to_gguf.py``
                 (:mod:`.cpu_peer_convert`: the demo tokenizer's pre-tokenizer named ``refact``)
    tokenize     llama.cpp tokenizes the prompts and other demo texts; every id must equal
                 transformers' (else the bench stops: the comparison would not be of the same work)
    runs         llama.cpp, moe-runtime resident and moe-runtime ``--offload disk`` at a budget, each
                 a child process (its own peak RSS), interleaved: for each repeat, for each thread
                 count, one run of each (the order rotated per repeat); greedy, batch 1, the prompts
                 one at a time after one untimed warm-up request
    figures      per run: load time (model construction; imports excluded, the family's modeling code
                 and moe-runtime's compiled ops too: ``model_code_import_s`` and ``ops_import_s`` in
                 the JSON), prefill tok/s (prompt tokens / time to the first token), decode tok/s
                 (later tokens / their time), peak RSS;
                 medians over the repeats, and moe-runtime / llama.cpp ratios at equal threads; the
                 generated tokens of every run are compared with llama.cpp's

The page cache is warm for both systems (the files were just written). Threads: llama.cpp's
``n_threads`` and ``n_threads_batch``; moe-runtime's torch intra-op threads (the offloaded run's
``compute_threads`` too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .memory import peak_rss_bytes, run_child

__all__ = ["CpuPeerSettings", "bench_cpu_peer", "format_table", "check_peer_installed"]

PEER_INSTALL = "pip install 'moe-runtime[peer]' (compiles llama.cpp: about 25 minutes on 2 cores)"
SYSTEMS = ("llama.cpp", "resident", "offload")
_MODULE = "moe_runtime.bench.cpu_peer"
_PROMPT_TOKENS = (20, 30)


@dataclass
class CpuPeerSettings:
    """Model shape and workload of the benchmark (the defaults are issue #19's)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 8
    num_experts: int = 16
    top_k: int = 2
    prompts: int = 4
    new_tokens: int = 32
    repeats: int = 3
    threads: tuple[int, ...] = (1, 2)
    offload_budget: str | None = "25%"  # None: no offloaded runs
    seed: int = 0

    def validate(self) -> None:
        flags = {"hidden_size": "--hidden", "num_hidden_layers": "--layers", "new_tokens": "--new-tokens",
                 "repeats": "--repeats", "prompts": "prompts"}  # fmt: skip
        for name, flag in flags.items():
            if getattr(self, name) <= 0:
                raise UsageError(f"{flag} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self._head_dim():
            raise UsageError(
                f"--hidden {self.hidden_size}: give a multiple of {self._head_dim()} (the attention head width)"
            )
        if not self.threads or any(t <= 0 for t in self.threads):
            raise UsageError(f"--thread-counts {self.threads}: give positive thread counts")
        if not 0 < self.top_k <= self.num_experts:
            raise UsageError(f"top-k {self.top_k} must be within 1..{self.num_experts} experts")

    def _head_dim(self) -> int:
        return 16 if self.hidden_size < 256 else 64

    def model_overrides(self) -> dict:
        """Config fields of the random Mixtral (demo tokenizer: vocabulary 1024, id 0 special)."""
        heads = self.hidden_size // self._head_dim()
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "vocab_size": 1024,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 4 if heads % 4 == 0 else heads,
            "head_dim": self._head_dim(),
            "max_position_embeddings": 1024,
            "sliding_window": None,  # full attention, as llama.cpp runs the architecture
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }


@dataclass
class _Job:
    """What one child process does (serialized by :func:`run_child`)."""

    overrides: dict = field(default_factory=dict)  # build
    seed: int = 0
    texts: list = field(default_factory=list)  # tokenize
    prompt_ids: list = field(default_factory=list)  # llama.cpp, resident, offload
    new_tokens: int = 0
    threads: int = 1
    budget: str = "25%"


def check_peer_installed() -> None:
    """Raise a usage error saying how to install llama-cpp-python when it is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UsageError(f"bench cpu-peer needs llama-cpp-python: {PEER_INSTALL}")


# child processes ---------------------------------------------------------------------------


def _child_build(out: Path, job: _Job, cache_dir: str) -> dict:
    import shutil

    import torch

    from ..io import atomic_dir
    from ..testing.random_models import build_random_model

    model = build_random_model("mixtral", seed=job.seed, dtype=torch.float32, **job.overrides)
    demo = Path(__file__).resolve().parents[1] / "demo" / "checkpoint"
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(demo / name, Path(tmp) / name)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def _llama(gguf: Path, threads: int, **kwargs):
    from llama_cpp import Llama

    return Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False, **kwargs)


def _child_tokenize(gguf: Path, job: _Job, cache_dir: str) -> dict:
    import llama_cpp

    llm = _llama(gguf, 1, vocab_only=True)  # the tokenizer only (llama-cpp-python >= 0.3.36, the extra's pin)
    ids = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in job.texts]
    return {
        "ids": ids,
        "pre_tokenizer": llm.metadata.get("tokenizer.ggml.pre"),
        "version": llama_cpp.__version__,
    }


def _child_llama(gguf: Path, job: _Job, cache_dir: str) -> dict:
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    llm = _llama(gguf, job.threads)
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    def generate(prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [next_token()]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        return tokens, first - start, time.perf_counter() - first

    generate(job.prompt_ids[0], 2)  # warm-up, untimed
    runs = [generate(prompt, job.new_tokens) for prompt in job.prompt_ids]
    return _summary(job, runs, load_s, {"version": llama_cpp.__version__})


def _child_moe(gguf_or_ckpt: Path, job: _Job, cache_dir: str, offload: bool) -> dict:
    import torch

    from ..runtime import DecodeConfig, MultiAdapterEngine, Request
    from ..runtime.offload import OffloadConfig

    torch.set_num_threads(job.threads)
    # transformers imports a family's modeling code (and with it torch._dynamo, sympy, scipy, ...) at
    # its first load: an import, timed apart from the load as llama-cpp-python's import is
    begun = time.perf_counter()
    _import_model_code(gguf_or_ckpt)
    import_s = time.perf_counter() - begun
    # moe-runtime's compiled ops (dlopen, op and fake-kernel registration): an import too, as
    # llama-cpp-python's loading of libllama is
    from ..ops._extension import load_extension

    begun = time.perf_counter()
    load_extension()
    ops_import_s = time.perf_counter() - begun
    config = None
    if offload:
        config = OffloadConfig(
            budget=job.budget, prefetch=("router",), cache_dir=cache_dir, compute_threads=job.threads
        )
    start = time.perf_counter()
    engine = MultiAdapterEngine.from_pretrained(gguf_or_ckpt, dtype="auto", offload=config)
    load_s = time.perf_counter() - start
    marks: list[float] = []
    decode_forward = [0.0]

    def before(module, args, kwargs):
        marks.append(time.perf_counter())

    def after(module, args, kwargs, output):
        now = time.perf_counter()
        if len(marks) == 1:  # the prompt's forward: the first token is known once it returns
            marks.append(now)
        else:
            decode_forward[0] += now - marks.pop()

    engine.model.register_forward_pre_hook(before, with_kwargs=True)
    engine.model.register_forward_hook(after, with_kwargs=True)

    def generate(prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        decode = DecodeConfig(max_new_tokens=new_tokens, max_batch_size=1, stop_on_eos=False)
        marks.clear()
        start = time.perf_counter()
        with torch.no_grad():
            tokens = engine.generate([Request(prompt=prompt)], decode)[0].token_ids
        end = time.perf_counter()
        return tokens, marks[1] - start, end - marks[1]

    generate(job.prompt_ids[0], 2)  # warm-up, untimed
    decode_forward[0] = 0.0
    runs = [generate(prompt, job.new_tokens) for prompt in job.prompt_ids]
    extra = {
        "decode_forward_s": decode_forward[0],
        "threads_seen": torch.get_num_threads(),
        "model_code_import_s": import_s,
        "ops_import_s": ops_import_s,
    }
    if offload:
        extra["hit_rate"] = engine.offload.stats.to_json()["hit_rate"]
    return _summary(job, runs, load_s, extra)


def _import_model_code(checkpoint: Path) -> None:
    """Import the checkpoint's causal-LM class (its family's modeling module) and the tokenizer code."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 (the import is the point)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(checkpoint, local_files_only=True))]


def _summary(job: _Job, runs: list[tuple[list[int], float, float]], load_s: float, extra: dict) -> dict:
    prompt_tokens = sum(len(p) for p in job.prompt_ids)
    prefill_s = sum(r[1] for r in runs)
    decode_s = sum(r[2] for r in runs)
    decode_tokens = sum(len(r[0]) - 1 for r in runs)
    return {
        "tokens": [r[0] for r in runs],
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": job.threads,
        **extra,
    }


_CHILDREN = {
    "build": _child_build,
    "tokenize": _child_tokenize,
    "llama.cpp": _child_llama,
    "resident": lambda path, job, cache: _child_moe(path, job, cache, offload=False),
    "offload": lambda path, job, cache: _child_moe(path, job, cache, offload=True),
}


# the parent --------------------------------------------------------------------------------


def _prompt_texts(tokenizer, count: int) -> list[str]:
    """``count`` demo documents (the domains in turn) cut at a word end to 20-30 tokens."""
    from ..demo.corpus import DOMAINS
    from ..demo.tasks import domain_texts

    texts: list[str] = []
    documents = {d: iter(domain_texts(d, 50, stream="cpu-peer")) for d in DOMAINS}
    while len(texts) < count:
        domain = DOMAINS[len(texts) % len(DOMAINS)]
        document = next(documents[domain])
        for match in re.finditer(r"\S+", document):
            n = len(tokenizer(document[: match.end()])["input_ids"])
            if n >= _PROMPT_TOKENS[0]:
                if n <= _PROMPT_TOKENS[1]:
                    texts.append(document[: match.end()])
                break
    return texts


def _check_texts() -> list[str]:
    """More text for the tokenization check: whole demo documents of every domain."""
    from ..demo.corpus import DOMAINS
    from ..demo.tasks import domain_texts

    return [t for d in DOMAINS for t in domain_texts(d, 4, stream="cpu-peer-check")]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _prefix_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(tokens before the first difference, all tokens) over the prompts."""
    agree = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for i, j in zip(x, y):
            if i != j:
                break
            agree += 1
    return agree, total


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_cpu_peer(
    settings: CpuPeerSettings,
    converter: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the benchmark (see the module docstring); returns its JSON fields.

    Raises:
        UsageError: llama-cpp-python is missing.
        RuntimeError: a child failed, or llama.cpp tokenizes a text differently from transformers.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..runtime.offload.store import default_cache_dir
    from .cpu_peer_convert import convert_to_gguf

    settings.validate()
    check_peer_installed()
    converter = Path(converter)
    overrides = settings.model_overrides()
    key = hashlib.sha256(json.dumps([overrides, settings.seed], sort_keys=True).encode()).hexdigest()[:12]
    work = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "bench"
    work = work / f"cpu-peer-{key}"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "hf"
    say = (lambda text: print(f"cpu-peer: {text}", file=sys.stderr)) if progress else (lambda text: None)
    if not (ckpt / "config.json").exists():
        say(f"building the random checkpoint in {ckpt}")
        built = run_child(_MODULE, "cpu-peer", "build", ckpt, _Job(overrides, settings.seed), work)
        (work / "built.json").write_text(json.dumps(built))
    built = json.loads((work / "built.json").read_text())
    gguf = work / f"model-f32-{_file_hash(converter)}.gguf"
    if not gguf.exists():
        say(f"converting to {gguf} with {converter}")
        convert_to_gguf(ckpt, gguf, converter)

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    prompts = _prompt_texts(tokenizer, settings.prompts)
    texts = prompts + _check_texts()
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    tokenized = run_child(_MODULE, "cpu-peer", "tokenize", gguf, _Job(texts=texts), work)
    for text, ours, theirs in zip(texts, expected, tokenized["ids"]):
        if ours != theirs:
            raise RuntimeError(
                f"bench cpu-peer: llama.cpp (pre-tokenizer {tokenized['pre_tokenizer']!r}) tokenizes "
                f"{text[:60]!r} as {theirs[:12]}... but transformers as {ours[:12]}...: the two systems "
                "would not run the same prompts"
            )
    prompt_ids = expected[: len(prompts)]

    load_before = list(os.getloadavg())
    systems = [s for s in SYSTEMS if s != "offload" or settings.offload_budget is not None]
    runs: dict[tuple[str, int], list[dict]] = {(s, t): [] for s in systems for t in settings.threads}
    bar = tqdm(
        total=settings.repeats * len(settings.threads) * len(systems),
        desc="cpu-peer",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for repeat in range(settings.repeats):
            order = systems[repeat % len(systems) :] + systems[: repeat % len(systems)]
            for threads in settings.threads:
                for system in order:
                    bar.set_postfix_str(f"{system}, {threads} thread{'s' if threads > 1 else ''}")
                    job = _Job(prompt_ids=prompt_ids, new_tokens=settings.new_tokens, threads=threads,
                               budget=settings.offload_budget or "")  # fmt: skip
                    path = gguf if system == "llama.cpp" else ckpt
                    runs[(system, threads)].append(run_child(_MODULE, "cpu-peer", system, path, job, work))
                    bar.update()

    reference = runs[("llama.cpp", settings.threads[0])][0]["tokens"]
    by_threads: dict[str, dict] = {}
    for threads in settings.threads:
        row: dict[str, dict] = {}
        for system in systems:
            got = runs[(system, threads)]
            agree, total = zip(*(_prefix_agreement(r["tokens"], reference) for r in got))
            row[system] = {
                "decode_tokens_per_s": _median(got, "decode_tokens_per_s"),
                "prefill_tokens_per_s": _median(got, "prefill_tokens_per_s"),
                "load_s": _median(got, "load_s"),
                "peak_rss_bytes": int(_median(got, "peak_rss_bytes")),
                "peak_rss_vs_weights": _median(got, "peak_rss_bytes") / built["bytes"],
                "token_match_rate": sum(agree) / sum(total),
                "tokens_identical": sum(agree) == sum(total),
                "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in got],
            }
        peer = row["llama.cpp"]
        for system in systems[1:]:
            row[system]["vs_llama_cpp"] = {
                "decode": row[system]["decode_tokens_per_s"] / peer["decode_tokens_per_s"],
                "prefill": row[system]["prefill_tokens_per_s"] / peer["prefill_tokens_per_s"],
                "peak_rss": row[system]["peak_rss_bytes"] / peer["peak_rss_bytes"],
                "load": row[system]["load_s"] / peer["load_s"],
            }
        by_threads[str(threads)] = row
    return {
        "bench": "cpu-peer",
        "settings": dataclasses.asdict(settings),
        "model": {**overrides, "parameters": built["parameters"], "bytes": built["bytes"]},
        "checkpoint": str(ckpt),
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "converter": str(converter),
        "llama_cpp_python": tokenized["version"],
        "pre_tokenizer": tokenized["pre_tokenizer"],
        "tokenization_checked_texts": len(texts),
        "prompt_tokens": [len(p) for p in prompt_ids],
        "prompts": prompts,
        "reference_tokens": reference,
        "load_average": {"start": load_before, "end": list(os.getloadavg())},  # 1, 5, 15 minutes
        "threads": by_threads,
    }


def format_table(result: dict) -> str:
    """The readable table: per thread count, llama.cpp, moe-runtime and the ratios."""
    model, s = result["model"], result["settings"]
    systems = [x for x in SYSTEMS if x in next(iter(result["threads"].values()))]
    lines = [
        f"bench cpu-peer: random Mixtral, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_experts']} experts top-{model['top_k']}, {model['parameters'] / 1e6:.0f}M parameters "
        f"({model['bytes'] / 1e9:.2f} GB f32)",
        f"  {s['prompts']} prompts of {min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens, "
        f"{s['new_tokens']} new tokens, greedy, batch 1, {s['repeats']} repeats interleaved (medians); "
        f"llama-cpp-python {result['llama_cpp_python']}, pre-tokenizer {result['pre_tokenizer']!r} "
        f"(ids equal to transformers' on {result['tokenization_checked_texts']} texts)",
        f"  load average (1 min) {result['load_average']['start'][0]:.1f} at the start, "
        f"{result['load_average']['end'][0]:.1f} at the end",
    ]
    names = {"llama.cpp": "llama.cpp", "resident": "moe-runtime", "offload": f"offload {s['offload_budget']}"}
    header = f"{'threads':>7}  {'':<14}" + "".join(f"{names[x]:>14}" for x in systems)
    header += "".join(f"{'ratio ' + ('res' if x == 'resident' else 'off'):>11}" for x in systems[1:])
    lines.append(
        "  ratio = moe-runtime / llama.cpp at equal threads (tok/s: above 1 is faster; load, RSS: below 1 is less)"
    )
    lines += ["", header]
    metrics = (("decode tok/s", "decode_tokens_per_s", 1, "decode", ".1f"),
               ("prefill tok/s", "prefill_tokens_per_s", 1, "prefill", ".1f"),
               ("load s", "load_s", 1, "load", ".2f"),
               ("peak RSS GB", "peak_rss_bytes", 1e9, "peak_rss", ".2f"))  # fmt: skip
    for threads, row in result["threads"].items():
        for label, key, scale, ratio, spec in metrics:
            line = f"{threads:>7}  {label:<14}" + "".join(f"{row[x][key] / scale:>14{spec}}" for x in systems)
            line += "".join(f"{row[x]['vs_llama_cpp'][ratio]:>10.2f}x" for x in systems[1:])
            lines.append(line)
        lines.append(
            f"{threads:>7}  {'RSS / weights':<14}"
            + "".join(f"{row[x]['peak_rss_vs_weights']:>14.2f}" for x in systems)
        )
        match = ", ".join(f"{names[x]} {row[x]['token_match_rate']:.3f}" for x in systems[1:])
        lines.append(f"{threads:>7}  {'tokens = llama.cpp':<14}  {match}")
    return "\n".join(lines)


def _main(argv: list[str]) -> None:
    mode, path, job_json, cache_dir, out = argv
    result = _CHILDREN[mode](Path(path), _Job(**json.loads(job_json)), cache_dir)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
