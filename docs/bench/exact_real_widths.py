"""By-hand check at real widths: HF float32 greedy tokens vs moe-runtime --offload disk (bf16 on disk, float32 compute)."""

import gc
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.offload import OffloadConfig
from moe_runtime.testing import shapes

torch.set_num_threads(1)
shape, layers = sys.argv[1], int(sys.argv[2])
out = Path(f"/tmp/scale/exact-{shape}-{layers}")
if not out.exists():
    shapes.write_checkpoint(shapes.shape_config(shape, layers=layers), out)
prompts = [[5, 17, 42, 7, 99, 12, 300, 801], [3, 250, 11, 64, 1000]]
ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
expected = []
with torch.no_grad():
    for p in prompts:
        o = ref.generate(
            torch.tensor([p]),
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        expected.append((o.sequences[0, len(p) :].tolist(), torch.cat(o.logits)))
del ref
gc.collect()
engine = MultiAdapterEngine.from_pretrained(
    out, dtype="auto", offload=OffloadConfig(budget="25%", cache_dir="/tmp/scale/c")
)
got = engine.generate(
    [Request(prompt=p, id=i) for i, p in enumerate(prompts)],
    DecodeConfig(max_new_tokens=4, output_logits=True, stop_on_eos=False),
)
res = []
for (tok, lg), c in zip(expected, got):
    res.append(
        {
            "hf": tok,
            "ours": c.token_ids,
            "equal": tok == c.token_ids,
            "max_abs_logit_diff": float((lg - c.logits).abs().max()),
            "logit_scale": float(lg.abs().max()),
        }
    )
print(
    json.dumps(
        {
            "shape": shape,
            "layers": layers,
            "store": engine.offload.store.kind,
            "storage": str(engine.offload.store.storage_dtype),
            "results": res,
        }
    )
)
shutil.rmtree(out)
