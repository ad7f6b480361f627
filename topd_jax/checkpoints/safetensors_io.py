"""Minimal streaming safetensors reader/writer on NumPy (bfloat16 via ml_dtypes).

`safetensors.numpy` cannot represent bfloat16 and `safetensors.flax` materialises each
tensor on the default JAX device; reading the documented format directly lets us check
every name/shape from the headers before touching any data, then read one tensor at a time
into host memory and place it straight into its target sharding.

Format: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Header of one .safetensors file; `read(name)` loads that tensor only."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        count = (end - begin) // dtype.itemsize
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=self._data_start + begin)
        return arr.reshape(e["shape"])


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file, fetching one tensor at a time (header first, from shapes).

    tensors: (name, shape, dtype) in file order; fetch(name) returns that array.
    """
    tensors = list(tensors)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in tensors:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes (the format allows space padding)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in tensors:
            arr = np.ascontiguousarray(fetch(name), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: fetched shape {arr.shape} but header says {tuple(shape)}")
            f.write(arr.tobytes())
