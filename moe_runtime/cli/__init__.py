"""The ``moe-runtime`` command line (verbs, flags and files are a stable contract).

Exit status: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from ..errors import UsageError
from . import bench, convert, demo, export, generate, profile, select, serve, simulate, tune
from ._common import close_distributed, compute_threads

__all__ = ["main", "build_parser"]

_VERBS = (demo, profile, select, tune, generate, serve, export, convert, simulate, bench)

EPILOG = """examples:
  moe-runtime demo
  moe-runtime demo-model --out ./demo-model
  moe-runtime profile --model demo --task arith=arith.jsonl --task code=code.jsonl --out prof/ --trace
  moe-runtime select --profile prof/ --task arith --score token --out arith_cfg.json
  moe-runtime generate --model demo --offload disk --expert-budget 25% --prompt '12 + 35 ='
  moe-runtime serve --model demo --adapter arith=ad/arith --port 8000
  moe-runtime simulate --trace prof/ --budget 25%
  moe-runtime export --model ./base --adapter ./arith-esft --out ./base-arith
  moe-runtime convert --adapter ./my-lora --to peft --out ./my-lora-peft

Run 'moe-runtime VERB --help' for the flags of each verb."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2 via UsageError).

    ``deferred`` holds functions that add arguments needing heavy imports (a verb's flags built
    from the tuning methods' configs); they run once, when this parser is first used, so other
    verbs and ``--help`` never import torch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deferred: list = []

    def _run_deferred(self) -> None:
        while self.deferred:
            self.deferred.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):
        self._run_deferred()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._run_deferred()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        verb = self.prog.partition(" ")[2]
        raise UsageError(f"{verb}: {message}" if verb else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moe-runtime",
        description="Profile, tune (ESFT, routed LoRA) and serve Mixture-of-Experts language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"moe-runtime {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb in _VERBS:
        verb.register(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line on stderr; other libraries' in Python's usual format."""
    from ..errors import AdapterWarning

    if issubclass(category, AdapterWarning):
        print(f"moe-runtime: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            print("moe-runtime: error: no command given (see the list above)", file=sys.stderr)
            return 2
        _quiet_libraries()
        with warnings.catch_warnings(), compute_threads(args):
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"moe-runtime: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-runtime: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception:  # noqa: BLE001 - the last resort: an internal error
        traceback.print_exc()
        print("moe-runtime: internal error (see the traceback above)", file=sys.stderr)
        return 1
    finally:
        if "torch" in sys.modules:  # never import torch just for this
            close_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
