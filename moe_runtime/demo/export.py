"""The shipped demo checkpoint and its export as a standard Hugging Face checkpoint directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from moe_runtime.demo.tasks import write_tasks
from moe_runtime.errors import UsageError
from moe_runtime.io import atomic_dir

__all__ = ["CHECKPOINT_FILES", "checkpoint_dir", "write_demo_model"]

CHECKPOINT_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "build_info.json",
)
"""Files of the shipped checkpoint (built by `python -m moe_runtime.demo.pretrain`)."""


def checkpoint_dir() -> Path:
    """Directory of the checkpoint shipped inside the package (`MODEL=demo`).

    Raises:
        UsageError: If the package was installed without its checkpoint files.
    """
    path = Path(__file__).resolve().parent / "checkpoint"
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise UsageError(f"demo checkpoint incomplete at {path}: missing {', '.join(missing)}")
    return path


def write_demo_model(out: Path) -> Path:
    """Write the demo model to `out` as a checkpoint plain transformers loads, plus `out/tasks/`.

    The files are written into a temporary directory next to `out`, then renamed into place, so
    a failure leaves no half-written output.

    Args:
        out: Target directory; may not exist yet or be empty.

    Returns:
        `out`.

    Raises:
        UsageError: If `out` exists and is not an empty directory.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty directory")
    src = checkpoint_dir()
    with atomic_dir(out) as tmp:
        for name in CHECKPOINT_FILES:
            shutil.copyfile(src / name, tmp / name)
        write_tasks(tmp / "tasks")
    return out
