"""One metrics sink: stdout summary, JSONL and TensorBoard; only process 0 writes.

Metrics travel as ``(sum, count)`` pairs (the losses' contract) and are reduced once, as
``Σ sum / Σ count``, when written: averaging over micro-batches, devices, hosts and log
intervals stays unbiased. Inside a jitted step the pairs are sums over the global (sharded)
batch already, so no extra collective is needed; ``PairAccumulator`` adds them up over the
steps of a log interval.

TensorBoard: a small built-in writer of scalar event files (TFRecord framing + the
``Event``/``Summary`` protobuf wire format, written by hand) — neither tensorboardX nor
TensorFlow is a dependency.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np

Pair = tuple[Any, Any]
Value = float | int | Pair


def reduce_pairs(metrics: Mapping[str, Value]) -> dict[str, float]:
    """``{name: (sum, count) | number}`` -> ``{name: float}``; a pair with count 0 -> nan."""
    out = {}
    for name, v in metrics.items():
        if isinstance(v, tuple):
            s, c = float(np.asarray(v[0])), float(np.asarray(v[1]))
            out[name] = s / c if c else math.nan
        else:
            out[name] = float(np.asarray(v))
    return out


class PairAccumulator:
    """Adds ``(sum, count)`` pairs over steps; plain numbers are treated as ``(x, 1)``."""

    def __init__(self):
        self._sums: dict[str, list[float]] = {}

    def add(self, metrics: Mapping[str, Value]) -> None:
        for name, v in metrics.items():
            s, c = (v if isinstance(v, tuple) else (v, 1))
            acc = self._sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(np.asarray(s))
            acc[1] += float(np.asarray(c))

    def pop(self) -> dict[str, Pair]:
        """The accumulated pairs; the accumulator starts empty again."""
        out, self._sums = {k: (s, c) for k, (s, c) in self._sums.items()}, {}
        return out


class MetricsSink:
    """Write reduced metrics per step to the enabled sinks.

    Args:
      output_dir: where ``metrics.jsonl`` and ``tb/`` go (created on first write).
      process_index: this host's index; sinks are disabled on every host but 0
        (default: ``jax.process_index()``).
    """

    def __init__(self, output_dir: str | Path, *, stdout: bool = True, jsonl: bool = True,
                 tensorboard: bool = True, process_index: int | None = None,
                 stream: IO[str] | None = None):
        if process_index is None:
            import jax
            process_index = jax.process_index()
        self.active = process_index == 0
        self.output_dir = Path(output_dir)
        self._stdout, self._stream = stdout, stream if stream is not None else sys.stdout
        self._jsonl = self._tb = None
        if self.active and (jsonl or tensorboard):
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.active and jsonl:
            self._jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if self.active and tensorboard:
            self._tb = TensorBoardWriter(self.output_dir / "tb")

    def write(self, step: int, metrics: Mapping[str, Value]) -> dict[str, float]:
        """Reduce and write one step's metrics; returns the reduced values."""
        values = reduce_pairs(metrics)
        if not self.active:
            return values
        if self._stdout:
            self._stream.write(format_summary(step, values) + "\n")
            self._stream.flush()
        if self._jsonl is not None:
            row = {"step": int(step), "time": time.time()}
            row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, values)
        return values

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._tb = None

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_summary(step: int, values: Mapping[str, float]) -> str:
    """``step 12 | loss 0.1234 | lr 2e-06 | ...`` (4 significant digits)."""
    return " | ".join([f"step {step}"] + [f"{k} {v:.4g}" for k, v in values.items()])


# ---------------------------------------------------------------- TensorBoard event files
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C (as in tensorflow/core/lib/hash/crc32c.h)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data
            + struct.pack("<I", _masked_crc(data)))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                file_version: str | None = None) -> bytes:
    """A serialized ``tensorflow.Event``: wall_time (1, double), step (2, int64), and either
    file_version (3) or summary (5) holding ``Summary.Value{tag: 1, simple_value: 2}``s."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
            for tag, v in scalars.items())
        msg += _field_bytes(5, values)
    return msg


class TensorBoardWriter:
    """Append scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(logdir) / name
        self._f = open(self.path, "wb")
        self._f.write(tfrecord(event_bytes(now, 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if values:
            self._f.write(tfrecord(event_bytes(time.time(), step, scalars=values)))
            self._f.flush()

    def close(self) -> None:
        self._f.close()
