"""Helpers shared by the CLI verbs."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

__all__ = [
    "COMPUTE_DTYPES",
    "add_verb",
    "budget_flag",
    "compute_threads",
    "physical_cores",
    "close_distributed",
    "init_distributed",
    "is_rank_zero",
]

# --compute-dtype choices (moe_runtime.models.compute_dtype resolves them; kept here: no torch import)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_verb(
    sub, name: str, *, help: str, description: str, examples: list[str], func, threads: bool = False
) -> argparse.ArgumentParser:
    """Add a verb parser with an examples epilog (``threads``: it takes ``--threads N``, see
    :func:`compute_threads`)."""
    if threads:
        examples = [*examples, f"moe-runtime {name} ... --threads 1   # compute on one core"]
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    if threads:
        parser.add_argument(
            "--threads",
            type=_positive_threads,
            default=None,
            metavar="N",
            help="compute threads, the same for resident and offloaded experts (default: the physical "
            "cores); set once for the whole command and restored after",
        )
    return parser


def _positive_threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of threads") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1 thread")
    return value


def physical_cores() -> int:
    """Physical CPU cores (logical ones where psutil cannot tell)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@contextlib.contextmanager
def compute_threads(args: argparse.Namespace) -> Iterator[None]:
    """The one thread policy: a verb with ``--threads`` computes with that many torch intra-op threads
    (default: the physical cores), set here at the edge and restored after. ``args.threads`` is
    resolved in place so the offload tier computes with the same number (``OffloadConfig``'s
    ``compute_threads``). Verbs without the flag run as they are."""
    if not hasattr(args, "threads"):
        yield
        return
    import torch

    if args.threads is None:
        args.threads = physical_cores()
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def budget_flag(flag: str, value: str):
    """Parse a budget flag once, at the edge, into a ``Budget`` (its errors name the flag)."""
    from ..errors import UsageError
    from ..runtime.offload.config import BudgetError, parse_budget

    try:
        return parse_budget(value)
    except BudgetError as exc:
        raise UsageError(f"{flag} {exc.detail}") from None


def disk_offload_config(args: argparse.Namespace):
    """The ``--offload disk [--expert-budget X]`` settings of a verb, or None (checked before anything loads)."""
    from ..errors import UsageError

    if args.offload == "none":
        for flag, value in (
            ("--expert-budget", args.expert_budget),
            ("--slot-dtype", getattr(args, "slot_dtype", None)),
        ):
            if value is not None and value != "compute":
                raise UsageError(f"{flag} goes with --offload disk")
        return None
    from ..runtime.offload import OffloadConfig

    budget = budget_flag("--expert-budget", "25%" if args.expert_budget is None else args.expert_budget)
    config = OffloadConfig(
        tier=args.offload, budget=budget, slot_dtype=getattr(args, "slot_dtype", "compute")
    )
    config.validate()
    return config


def offload_summary(tier) -> str:
    """One stderr line: slots, resident expert bytes against all routed experts, reads."""
    stats = tier.stats
    return (
        f"offload: {tier.num_slots} expert slots per layer, {tier.resident_expert_bytes()} of "
        f"{tier.offloaded_bytes()} routed-expert bytes in RAM; {stats.misses} reads, "
        f"{stats.bytes_read} bytes read, hit rate {stats.hit_rate:.3f}"
    )


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
