"""A Hugging Face checkpoint to GGUF through llama.cpp's own converter, ``convert_hf_to_gguf.py``.

The converter names the tokenizer's pre-tokenizer in the GGUF (``tokenizer.ggml.pre``) by hashing how
the tokenizer splits a fixed text, and refuses a hash it does not list. The demo tokenizer (single
digits, then GPT-2's byte-level split) is not listed, but llama.cpp's ``refact`` pre-tokenizer splits
the same way. :func:`convert_to_gguf` therefore runs the converter unmodified in a child process
(``python -m moe_runtime.bench.cpu_peer_convert``) whose hash lookup falls back to a given name where
the converter raises; a hash the converter knows keeps its own name. The benchmark then checks that
llama.cpp tokenizes its prompts exactly as transformers does.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ..errors import UsageError

__all__ = ["CONVERTER_ENV", "convert_to_gguf", "find_converter", "how_to_get_converter"]

CONVERTER_ENV = "LLAMA_CPP_CONVERTER"
CONVERTER_NAME = "convert_hf_to_gguf.py"
LLAMA_CPP_DIR_ENV = "LLAMA_CPP_DIR"


def how_to_get_converter() -> str:
    return (
        f"pass --converter PATH/{CONVERTER_NAME} or set ${CONVERTER_ENV}; the converter ships in llama.cpp's "
        "source (a llama.cpp checkout, or vendor/llama.cpp in the llama-cpp-python sdist: "
        "pip download --no-binary :all: --no-deps llama-cpp-python), with its conversion/ and gguf-py/ "
        "folders beside it; it needs the packages of moe-runtime[peer]"
    )


def find_converter(explicit: str | Path | None = None) -> Path:
    """The converter script: ``explicit``, else ``$LLAMA_CPP_CONVERTER``, else ``convert_hf_to_gguf.py``
    in ``$LLAMA_CPP_DIR`` or in a ``llama.cpp`` folder of the working directory or the home directory.

    Raises:
        UsageError: the named file is missing, or none was found (saying how to get one).
    """
    named = explicit or os.environ.get(CONVERTER_ENV)
    if named:
        path = Path(named).expanduser()
        if path.is_dir():
            path = path / CONVERTER_NAME
        if not path.is_file():
            source = "--converter" if explicit else f"${CONVERTER_ENV}"
            raise UsageError(f"{source} {named}: no such file ({how_to_get_converter()})")
        return _check_needs(path.resolve())
    folders = [Path(os.environ[LLAMA_CPP_DIR_ENV])] if os.environ.get(LLAMA_CPP_DIR_ENV) else []
    folders += [Path.cwd() / "llama.cpp", Path.home() / "llama.cpp"]
    for folder in folders:
        if (folder / CONVERTER_NAME).is_file():
            return _check_needs((folder / CONVERTER_NAME).resolve())
    raise UsageError(f"llama.cpp's {CONVERTER_NAME} was not found: {how_to_get_converter()}")


def _check_needs(converter: Path) -> Path:
    """The converter's own imports beyond torch and transformers: gguf (its gguf-py folder or the
    package) and sentencepiece (imported before it looks for a SentencePiece model)."""
    missing = [name for name in ("sentencepiece",) if importlib.util.find_spec(name) is None]
    if not (converter.parent / "gguf-py").is_dir() and importlib.util.find_spec("gguf") is None:
        missing.insert(0, "gguf")
    if missing:
        raise UsageError(f"{converter} needs {' and '.join(missing)}: pip install 'moe-runtime[peer]'")
    return converter


def convert_to_gguf(
    checkpoint: str | Path, out: str | Path, converter: str | Path, *, pre_tokenizer: str = "refact"
) -> Path:
    """Convert ``checkpoint`` to a float32 GGUF file ``out`` (written under a temporary name, renamed
    into place).

    Args:
        checkpoint: a Hugging Face checkpoint directory of an architecture the converter knows.
        out: the GGUF file to write.
        converter: path of ``convert_hf_to_gguf.py``.
        pre_tokenizer: llama.cpp pre-tokenizer named where the converter does not recognize the
            tokenizer's.

    Raises:
        RuntimeError: the converter failed (the end of its output attached).
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    args = [sys.executable, "-m", __name__, str(converter), pre_tokenizer,
            str(checkpoint), "--outtype", "f32", "--outfile", str(tmp)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise RuntimeError(f"llama.cpp's converter {converter} failed on {checkpoint}:\n{tail}")
    os.replace(tmp, out)
    return out


def _lookup_owner(module, converter: Path):
    """The class defining the converter's pre-tokenizer lookup (``get_vocab_base_pre``): in the
    ``conversion`` package of recent llama.cpp, in the script itself in older ones."""
    candidates = [getattr(module, "TextModel", None), getattr(module, "Model", None)]
    conversion = sys.modules.get("conversion")
    if conversion is not None:
        candidates.insert(0, getattr(conversion, "TextModel", None))
    for owner in candidates:
        if owner is not None and hasattr(owner, "get_vocab_base_pre"):
            return owner
    raise RuntimeError(
        f"{converter}: no get_vocab_base_pre found (a llama.cpp version this bench does not know)"
    )


def _run_converter(converter: Path, pre_tokenizer: str, argv: list[str]) -> None:
    """Run the converter's ``main()`` with ``argv``, its pre-tokenizer lookup falling back to
    ``pre_tokenizer`` where it raises ``NotImplementedError`` (an unlisted hash)."""
    sys.path.insert(0, str(converter.parent))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = module
    spec.loader.exec_module(module)
    owner = _lookup_owner(module, converter)
    lookup = owner.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return lookup(self, tokenizer)
        except NotImplementedError:
            print(f"moe-runtime: pre-tokenizer not recognized, named '{pre_tokenizer}'", file=sys.stderr)
            return pre_tokenizer

    owner.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(converter), *argv]
    module.main()


if __name__ == "__main__":
    _run_converter(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
