"""peft LoRA adapters served together in one mixed batch vs peft itself, one adapter at a time.

N peft adapters (LoRA on q/o projections and on every fused expert parameter, random non-zero
weights, saved by peft) and R requests spread over them:
  ours: MultiAdapterEngine with every adapter loaded, one generate over all requests
  peft: PeftModel with every adapter loaded; per adapter set_adapter, then one batched
        (left-padded) generate over that adapter's requests -- peft refuses mixed-adapter
        batches for parameter targets, so this is how peft serves them
Both greedy, the same number of new tokens per request (no early stop); median of repeats.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["bench_peft_mixed"]


def _write_adapters(model_path, directory: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    from ..models import find_moe_layers, load_model

    paths = []
    for i in range(count):
        model = load_model(model_path, dtype=torch.float32)
        info = find_moe_layers(model)
        targets = sorted(
            {
                f"{layer.experts_name.split(f'layers.{layer.index}.', 1)[-1]}.{name}"
                for layer in info.layers
                for name in (layer.layout.up_name, "down_proj")
            }
        )
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "o_proj"], target_parameters=targets
        )
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        paths.append(directory / f"peft{i}")
        peft_model.save_pretrained(paths[-1])
    return paths


def bench_peft_mixed(
    model: str = "demo",
    *,
    adapters: int = 4,
    requests_per_adapter: int = 4,
    new_tokens: int = 16,
    rank: int = 8,
    repeats: int = 3,
    threads: int = 2,
) -> dict:
    """Time both ways of serving the same requests; see the module docstring.

    Returns:
        ``adapters``, ``requests``, ``new_tokens``, ``mixed_batch_s``, ``peft_one_at_a_time_s``,
        ``speedup_vs_peft`` and ``token_agreement`` (share of the tokens before each request's first
        EOS that are equal in both).
    """
    from peft import PeftModel

    from ..models import load_model
    from ..runtime import DecodeConfig, MultiAdapterEngine, Request
    from ..runtime.engine import eos_ids_of

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_adapters(model, Path(tmp), adapters, rank)
        names = [p.name for p in paths]
        engine = MultiAdapterEngine(load_model(model, dtype=torch.float32))
        for name, path in zip(names, paths):
            engine.add_adapter(name, path)
        vocab = engine.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(0)
        requests = [
            Request(torch.randint(3, vocab, (int(n),), generator=generator).tolist(), name, new_tokens)
            for name in names
            for n in torch.randint(6, 20, (requests_per_adapter,), generator=generator)
        ]
        peft_model = PeftModel.from_pretrained(
            load_model(model, dtype=torch.float32), str(paths[0]), adapter_name=names[0]
        )
        for name, path in zip(names[1:], paths[1:]):
            peft_model.load_adapter(str(path), adapter_name=name)
        peft_model.eval()
        config = DecodeConfig(max_new_tokens=new_tokens, stop_on_eos=False)

        def ours() -> dict:
            return {i: c.token_ids for i, c in enumerate(engine.generate(requests, config))}

        def peft_each() -> dict:
            out = {}
            for name in names:
                peft_model.set_adapter(name)
                rows = [i for i, r in enumerate(requests) if r.adapter == name]
                width = max(len(requests[i].prompt) for i in rows)
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for j, i in enumerate(rows):
                    prompt = requests[i].prompt
                    ids[j, width - len(prompt) :] = torch.tensor(prompt)
                    mask[j, width - len(prompt) :] = 1
                with torch.no_grad():
                    gen = peft_model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                    )  # fmt: skip
                for j, i in enumerate(rows):
                    out[i] = gen[j, width:].tolist()
            return out

        times = {"ours": [], "peft": []}
        results = {}
        for _ in range(repeats):
            for key, run in (("ours", ours), ("peft", peft_each)):
                start = time.perf_counter()
                results[key] = run()
                times[key].append(time.perf_counter() - start)
        eos = eos_ids_of(engine.model, engine.tokenizer)
        engine.close()
    same = total = 0
    for i, tokens in results["ours"].items():
        cut = next((n for n, t in enumerate(tokens) if t in eos), len(tokens))
        same += sum(a == b for a, b in zip(tokens[:cut], results["peft"][i][:cut]))
        total += cut
    mixed, each = statistics.median(times["ours"]), statistics.median(times["peft"])
    return {
        "model": str(model),
        "adapters": adapters,
        "requests": len(requests),
        "new_tokens": new_tokens,
        "threads": threads,
        "mixed_batch_s": mixed,
        "peft_one_at_a_time_s": each,
        "speedup_vs_peft": each / mixed,
        "token_agreement": same / total if total else float("nan"),
    }
