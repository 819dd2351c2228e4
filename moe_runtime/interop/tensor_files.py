"""safetensors files read and written tensor by tensor with plain file I/O, never memory-mapped.

``safe_open(...).get_tensor`` reads through a memory map of the whole file: every page touched stays
mapped, and counted in the process's resident memory, until the file is closed, so streaming a file
tensor by tensor that way still ends up "holding" all of it. Here each tensor is read with ``pread``
into its own buffer (freed when dropped), and a shard is written header first, then each tensor's
bytes straight from its storage (no serialized copy of the shard).

File format (safetensors): 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces
to a multiple of 8, then the tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

__all__ = ["TensorFile", "write_tensors"]

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorFile:
    """The header of one safetensors file, and its tensors read one at a time.

    Raises (constructor):
        OSError / ValueError: unreadable file or header.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data_start = 8 + size

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in a fresh buffer of its own.

        Raises:
            KeyError: no such tensor; OSError: a short read.
        """
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        if end > begin:
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [buffer], self.data_start + begin)
            if got != end - begin:
                raise OSError(f"{self.path}: short read of {name} ({got} of {end - begin} bytes)")
        return tensor


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (CPU) as a safetensors file, each tensor's bytes copied from its storage."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
