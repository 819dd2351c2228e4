"""The embedded demo model (`MODEL=demo`): a small fine-grained Qwen2-MoE built by this project.

- `corpus`: six generated domains (arith, kv, code, prose, cipher, sort) with a held-out partition.
- `tasks`: held-out tuning tasks (prompt/response), per-domain texts and the general set.
- `tokenizer`: byte-level BPE trained on the corpus.
- `pretrain`: the deterministic build script (`python -m moe_runtime.demo.pretrain --out DIR`).
- `export`: the shipped checkpoint and `write_demo_model` (behind `moe-runtime demo-model`).

Importing this package needs no torch; only `tokenizer` and `pretrain` import it.
"""

from __future__ import annotations

from moe_runtime.demo.export import checkpoint_dir, write_demo_model
from moe_runtime.demo.tasks import TASKS, write_tasks

__all__ = ["TASKS", "checkpoint_dir", "write_demo_model", "write_tasks"]
