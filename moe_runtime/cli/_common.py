"""Helpers shared by the CLI verbs."""

from __future__ import annotations

import argparse
import os

__all__ = [
    "COMPUTE_DTYPES",
    "add_verb",
    "budget_flag",
    "close_distributed",
    "init_distributed",
    "is_rank_zero",
]

# --compute-dtype choices (moe_runtime.models.compute_dtype resolves them; kept here: no torch import)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_verb(
    sub, name: str, *, help: str, description: str, examples: list[str], func
) -> argparse.ArgumentParser:
    """Add a verb parser with an examples epilog."""
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def budget_flag(flag: str, value: str):
    """Parse a budget flag once, at the edge, into a ``Budget`` (its errors name the flag)."""
    from ..errors import UsageError
    from ..runtime.offload.config import BudgetError, parse_budget

    try:
        return parse_budget(value)
    except BudgetError as exc:
        raise UsageError(f"{flag} {exc.detail}") from None


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def close_distributed() -> None:
    """Leave the process group, if one was joined (its threads must stop before the interpreter does:
    left to exit-time destructors, a gloo thread could abort the process after the work was done)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank_zero() -> bool:
    import torch

    return (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    )
