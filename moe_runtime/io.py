"""Atomic outputs: every file and directory is written to a temporary path and renamed into place.

A failed command therefore never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

__all__ = [
    "atomic_dir",
    "atomic_write_text",
    "atomic_write_json",
    "check_output_dir",
    "check_output_file",
    "write_json_lines",
    "write_probe_error",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output '{path}': cannot create its directory ({exc.strerror or exc})") from None


def _write_error(path: Path, directory: Path, exc: OSError) -> UsageError:
    return UsageError(f"output '{path}': cannot write in '{directory}' ({exc.strerror or exc})")


def write_probe_error(directory: Path) -> OSError | None:
    """Create and remove a file in ``directory``; the error if that fails (None: it takes new files)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe_runtime.", suffix=".probe", dir=directory)
    except OSError as exc:
        return exc
    os.close(fd)
    os.unlink(probe)
    return None


def _check_writable(path: Path) -> None:
    """Refuse ``path`` if its directory (or the nearest existing ancestor) does not take new files."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"output '{path}': cannot create its directory ('{parent}' is not a directory)")
    error = write_probe_error(parent)
    if error is not None:
        raise _write_error(path, parent, error)


def check_output_file(path: str | Path) -> Path:
    """Refuse an output file path :func:`atomic_write_text` would fail on; call it before long work.

    Nothing is created.

    Raises:
        UsageError: ``path`` is a directory, or its directory cannot take new files.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output '{path}' is a directory (expected a file path)")
    _check_writable(path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory and rename it.

    Raises:
        UsageError: ``path`` is a directory, or its parent cannot be created.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output '{path}' is a directory (expected a file path)")
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, path.parent, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, obj: object) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_json_lines(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL, atomically."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_output_dir(out: str | Path, *, replace_marker: str | None = None) -> Path:
    """Refuse an output directory :func:`atomic_dir` would refuse; call it before long work.

    Raises:
        UsageError: ``out`` is a file, or a non-empty directory without ``replace_marker``.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output '{out}' exists and is not a directory")
        replaceable = replace_marker is not None and (out / replace_marker).exists()
        if any(out.iterdir()) and not replaceable:
            raise UsageError(f"output directory '{out}' exists and is not empty")
    _check_writable(out)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, replace_marker: str | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``out`` on success.

    Args:
        out: the final directory.
        replace_marker: if ``out`` already exists and contains this file (an earlier output of the
            same kind), it is replaced; an existing non-empty directory without it is refused, so
            user data is never clobbered.

    Yields:
        The temporary directory to fill. On an exception it is removed and ``out`` is untouched.

    Raises:
        UsageError: ``out`` exists, is not empty, and is not a replaceable earlier output.
    """
    out = check_output_dir(out, replace_marker=replace_marker)
    _make_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise _write_error(out, out.parent, exc) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for file in tmp.rglob("*"):  # safetensors writes 0600 files; outputs get ordinary permissions
            if file.is_file() and not file.is_symlink():
                os.chmod(file, mode)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
