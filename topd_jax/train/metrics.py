"""One metrics sink: stdout summary, JSONL, TensorBoard and (optional) W&B; only process 0
writes.

Metrics travel as ``(sum, count)`` pairs (the losses' contract) and are reduced once, as
``Σ sum / Σ count``, when written: averaging over micro-batches, devices, hosts and log
intervals stays unbiased. Inside a jitted step the pairs are sums over the global (sharded)
batch already, so no extra collective is needed; ``PairAccumulator`` adds them up over the
steps of a log interval.

TensorBoard: a small built-in writer of scalar event files (TFRecord framing + the
``Event``/``Summary`` protobuf wire format, written by hand) — neither tensorboardX nor
TensorFlow is a dependency.

Weights & Biases (``logging.wandb``, off by default): ``wandb`` is imported only when it is
on and is never a dependency; each ``write`` is one ``run.log(values, step=step)``. W&B's
history cannot be rewound, so every start is a new W&B run.

Resume: ``MetricsSink(..., resume_from=s)`` first drops what an earlier (killed) run wrote
after step ``s`` — the rows of ``metrics.jsonl`` and the events of ``tb/`` with a step
``> s`` (each file rewritten to a temporary file and renamed over the original) — and
starts its event file with TensorBoard's ``SessionLog.START`` at step ``s + 1``, which tells
a TensorBoard that already loaded the old events to purge those at or after that step. A run
killed between two checkpoints therefore logs each step once after its resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

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

    def get_state(self) -> dict[str, list]:
        """JSON-safe ``{name: [sum (None if not finite), count]}``: the unfinished log interval
        that a checkpoint keeps, so a resumed run logs the same interval means."""
        return {k: [s if math.isfinite(s) else None, c] for k, (s, c) in self._sums.items()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._sums = {k: [math.nan if s is None else float(s), float(c)] for k, (s, c) in state.items()}


class MetricsSink:
    """Write reduced metrics per step to the enabled sinks.

    Args:
      output_dir: where ``metrics.jsonl`` and ``tb/`` go (created on first write).
      process_index: this host's index; sinks are disabled on every host but 0
        (default: ``jax.process_index()``).
      resume_from: the step this run continues from: rows and events with a larger step,
        left by an earlier run, are dropped first (``-1``: all of them; None: keep
        everything and append).
      stream: where the ``stdout`` summary lines go (default ``sys.stdout``); they are written
        with ``tqdm.write``, so a progress bar on the terminal stays intact.
      wandb: keyword arguments of ``wandb.init`` (project, entity, name, config, ...) to mirror
        every write to a W&B run; None (default): no W&B, and ``wandb`` is not imported.
    """

    def __init__(self, output_dir: str | Path, *, stdout: bool = True, jsonl: bool = True,
                 tensorboard: bool = True, process_index: int | None = None,
                 stream: IO[str] | None = None, resume_from: int | None = None,
                 wandb: Mapping[str, Any] | None = None):
        if process_index is None:
            import jax
            process_index = jax.process_index()
        self.active = process_index == 0
        self.output_dir = Path(output_dir)
        self._stdout, self._stream = stdout, stream if stream is not None else sys.stdout
        self._jsonl = self._tb = self._wandb = None
        if self.active and (jsonl or tensorboard):
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.active and resume_from is not None:
            dropped = rewind_jsonl(self.output_dir / "metrics.jsonl", resume_from)
            dropped += sum(rewind_event_file(p, resume_from)
                           for p in sorted((self.output_dir / "tb").glob("events.out.tfevents.*")))
            if dropped:
                log.info("dropped %d metric rows/events after step %d (written before the resume)",
                         dropped, resume_from)
        if self.active and jsonl:
            self._jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if self.active and tensorboard:
            self._tb = TensorBoardWriter(self.output_dir / "tb",
                                         purge_step=None if resume_from is None else resume_from + 1)
        if self.active and wandb is not None:
            self._wandb = WandbRun(**wandb)

    def write(self, step: int, metrics: Mapping[str, Value]) -> dict[str, float]:
        """Reduce and write one step's metrics; returns the reduced values."""
        values = reduce_pairs(metrics)
        if not self.active:
            return values
        if self._stdout:  # through tqdm: clears and redraws an active progress bar
            tqdm.write(format_summary(step, values), file=self._stream)
            self._stream.flush()
        if self._jsonl is not None:
            row = {"step": int(step), "time": time.time()}
            row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, values)
        if self._wandb is not None:
            self._wandb.log(step, values)
        return values

    def close(self) -> None:
        for f in (self._jsonl, self._tb, self._wandb):
            if f is not None:
                f.close()
        self._jsonl = self._tb = self._wandb = None

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rewind_jsonl(path: str | Path, through_step: int) -> int:
    """Keep the rows of a ``metrics.jsonl`` with ``step <= through_step`` (a torn last line,
    from a kill mid-write, is dropped too); the file is replaced atomically. Returns the
    number of lines dropped (0 and untouched if there is nothing to drop or no file)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= through_step
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        _atomic_write(path, "".join(kept).encode("utf-8"))
    return dropped


class WandbMissingError(ImportError):
    pass


def import_wandb():
    """The ``wandb`` module, or ``WandbMissingError`` saying how to get it or turn it off."""
    try:
        import wandb
    except ImportError:
        raise WandbMissingError("logging.wandb=true needs the wandb package (pip install wandb, or "
                                "the topd_jax[wandb] extra); or set logging.wandb=false") from None
    return wandb


class WandbRun:
    """One W&B run: ``wandb.init(**init)``, ``log`` per write, ``finish`` on close."""

    def __init__(self, **init: Any):
        self._run = import_wandb().init(**init)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=int(step))

    def close(self) -> None:
        self._run.finish()


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


SESSION_START = 1  # tensorflow.SessionLog.SessionStatus.START


def event_bytes(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                file_version: str | None = None, session_status: int | None = None) -> bytes:
    """A serialized ``tensorflow.Event``: wall_time (1, double), step (2, int64), and one of
    file_version (3), summary (5) holding ``Summary.Value{tag: 1, simple_value: 2}``s, or
    session_log (7) ``SessionLog{status: 1}``."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if session_status is not None:
        msg += _field_bytes(7, b"\x08" + _varint(session_status))
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
            for tag, v in scalars.items())
        msg += _field_bytes(5, values)
    return msg


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def event_info(event: bytes) -> tuple[int, frozenset[int]]:
    """``(step, field numbers present)`` of a serialized ``tensorflow.Event`` (step 0 if
    unset): 3 marks the file_version header, 5 a summary, 7 a session log."""
    step, fields, i = 0, set(), 0
    while i < len(event):
        key, i = _read_varint(event, i)
        number, wire = key >> 3, key & 7
        fields.add(number)
        if wire == 0:
            value, i = _read_varint(event, i)
            if number == 2:
                step = value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _read_varint(event, i)
            i += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in an event")
    return step, frozenset(fields)


def read_tfrecords(data: bytes) -> list[bytes]:
    """The records of a TFRecord file, up to the first torn or corrupt one (a kill mid-write)."""
    out, i = [], 0
    while i + 12 <= len(data):
        length = data[i:i + 8]
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked_crc(length):
            break
        (n,) = struct.unpack("<Q", length)
        body, crc = data[i + 12:i + 12 + n], data[i + 12 + n:i + 16 + n]
        if len(body) < n or len(crc) < 4 or struct.unpack("<I", crc)[0] != _masked_crc(body):
            break
        out.append(body)
        i += 16 + n
    return out


def rewind_event_file(path: str | Path, through_step: int) -> int:
    """Keep the events of a TensorBoard file with ``step <= through_step`` (and its
    file_version header); the file is replaced atomically, or removed when no summary is
    left. Returns the number of events dropped."""
    path = Path(path)
    data = path.read_bytes()
    records = read_tfrecords(data)
    kept, content = [], False
    for r in records:
        step, fields = event_info(r)
        is_header = 3 in fields
        if is_header or step <= through_step:
            kept.append(r)
            content |= not is_header
    dropped = len(records) - len(kept)
    if not content:
        path.unlink()
    elif dropped or sum(16 + len(r) for r in records) != len(data):
        _atomic_write(path, b"".join(tfrecord(r) for r in kept))
    return dropped


class TensorBoardWriter:
    """Append scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>.<pid>``.

    ``purge_step``: the file starts with ``SessionLog.START`` at that step, so a running
    TensorBoard drops the events at or after it that it read from earlier files (a resume).
    """

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(logdir) / name
        self._f = open(self.path, "ab")  # a second writer in the same second and process appends
        self._f.write(tfrecord(event_bytes(now, 0, file_version="brain.Event:2")))
        if purge_step is not None:
            self._f.write(tfrecord(event_bytes(now, purge_step, session_status=SESSION_START)))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if values:
            self._f.write(tfrecord(event_bytes(time.time(), step, scalars=values)))
            self._f.flush()

    def close(self) -> None:
        self._f.close()
