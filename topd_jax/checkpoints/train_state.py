"""Train-state checkpoints: an Orbax ``CheckpointManager`` with resume and preemption care.

    ckpt = TrainCheckpointer(dir, every=100, keep=3)
    ckpt.save(step, state, data=loader.get_state(), config=to_dict(cfg), metrics={...})
    restored = ckpt.restore(abstract_state)   # latest *good* step, into the target shardings
    ckpt.close()

One checkpoint = four items: ``state`` (the train-state pytree — params, optimizer state,
step, PRNG key — via ``StandardSave``), and JSON items ``data`` (data-iterator state),
``config`` and ``metrics``. Orbax writes each step to a temporary directory and renames it
when complete, so a save killed mid-way leaves only a tmp directory, which is never listed.
A finalized step that still fails to restore (truncated or corrupted files) is skipped with
a warning, moved aside to ``broken-<step>``, and the previous step is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
_ITEMS = ("state", "data", "config", "metrics")


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data: dict
    config: dict
    metrics: dict


def abstract_state(tree: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct`` pytree of ``tree`` (arrays or abstract), with ``shardings`` (a
    matching pytree of ``jax.sharding.Sharding``) or each leaf's own sharding."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy (numpy/jax scalars -> Python numbers); raises on anything else."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item")
                                 else _refuse(o)))


def _refuse(o: Any):
    raise TypeError(f"not JSON-serialisable in a checkpoint item: {type(o).__name__} {o!r:.80}")


class TrainCheckpointer:
    """Save every ``every`` steps (and when forced: end of run, preemption), keep ``keep``."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"every and keep must be >= 1, got every={every} keep={keep}")
        self.directory, self.every = Path(directory).absolute(), every
        # The interval is decided here (step % every == 0): Orbax's own policy would also
        # save the first step of every run, a needless full save of a large model.
        self._options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=_ITEMS)

    @property
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether ``save(step, ..., force=force)`` would write: lets a caller skip building
        the save's items (e.g. a long metrics history) on the steps in between."""
        if not force and step % self.every:
            return False
        return int(step) not in self._manager.all_steps()  # e.g. a forced final save right after the periodic one

    def save(self, step: int, state: Any, *, data: dict, config: dict, metrics: dict,
             force: bool = False) -> bool:
        """Save if ``step % every == 0`` or ``force``; True if a save started.

        With async saving the arrays are copied off-device before this returns, so the
        caller may donate ``state`` to the next step; files finish in the background.
        """
        if not self.due(step, force=force):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_jsonable(data)),
            config=ocp.args.JsonSave(_jsonable(config)),
            metrics=ocp.args.JsonSave(_jsonable(metrics)))
        return bool(self._manager.save(int(step), args=args, force=True))

    def restore(self, target: Any, step: int | None = None) -> Restored | None:
        """Restore ``step`` (default: the latest that restores) into ``target``.

        ``target`` is an abstract pytree (``ShapeDtypeStruct`` with shardings, see
        ``abstract_state``): arrays come back laid out as it says, whatever the sharding at
        save time. Returns None when there is no checkpoint at all.
        """
        self.wait()
        candidates = [step] if step is not None else sorted(self.steps, reverse=True)
        failed = []
        for s in candidates:
            try:
                r = self._manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(), metrics=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                if step is not None:
                    raise
                log.warning("checkpoint step %d in %s is unusable (%s: %.200s); falling back "
                            "to an earlier step", s, self.directory, type(e).__name__, e)
                failed.append(s)
                continue
            self._quarantine(failed)
            return Restored(s, r.state, r.data, r.config, r.metrics)
        if failed:
            raise RuntimeError(f"no checkpoint in {self.directory} restores; tried steps "
                               f"{failed} (see warnings above)")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Move broken step directories aside so the resumed run can save those steps again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst, n = self.directory / f"broken-{s}", 1
                while dst.exists():
                    dst, n = self.directory / f"broken-{s}.{n}", n + 1
                src.rename(dst)
                log.warning("moved unusable checkpoint %s to %s", src, dst)
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionFlag:
    """Sets ``requested`` when SIGTERM (or another given signal) arrives.

    The training loop checks ``flag.requested`` after each step; when set it saves (forced),
    waits for the files, and exits 0. The handler only sets a flag: nothing unsafe runs
    inside a signal handler. Use as a context manager to restore the previous handlers.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event, self._signals, self._previous = threading.Event(), signals, {}
        self.received: int | None = None

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
