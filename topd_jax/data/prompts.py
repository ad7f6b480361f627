"""Prompt pipeline: JSONL/parquet ``problem``/``answer`` files -> left-padded token batches.

    examples, stats = load_prompts(["math_train.jsonl"], format_prompt, tokenizer, 800)
    loader = PromptLoader(examples, batch_size=8, prompt_len=800, pad_id=tok.pad_id, seed=0)
    batch = next(loader)   # {"prompt_ids" [B,P] int32, "prompt_mask" [B,P] bool, "answers"}
    state = loader.get_state()          # JSON-safe; PromptLoader(...).set_state(state) resumes

Prompts are formatted (chat template: ``format_prompt``) and tokenized once up front, so the
count of prompts skipped for length is known before training starts. Batching, seeded
per-epoch shuffling, host sharding and the resumable iterator come from grain's
``MapDataset`` (no worker processes: the work per batch is a gather and a pad).

Records are read by ``topd_jax.data.jsonl`` (the one reader, shared with evaluation: every
error names file and line); parquet rows go through the same record check, named by row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import grain
import numpy as np

from topd_jax.data.jsonl import MathItem, parse_math_record, read_math_jsonl


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class PromptExample:
    ids: tuple[int, ...]
    answer: str | tuple[str, ...]  # a tuple for a multi-value answer (see rewards.math)
    where: str  # "<file> id <id>", for messages
    problem: str = ""  # the problem text before templating (TAPO's synthesis prompt quotes it)
    response: str | None = None  # the target text of a supervised (SFT) example


@dataclass(frozen=True)
class PromptStats:
    total: int
    kept: int
    skipped_too_long: int


def read_records(path: str | Path) -> list[MathItem]:
    """Items of a ``.jsonl`` file (``read_math_jsonl``) or a ``.parquet`` file.

    Both need ``problem`` and ``answer``; JSONL also needs ``id`` (parquet rows without one
    get ``"<stem>-<row>"``). Errors name the file and line (row for parquet).
    """
    path = Path(path)
    if path.suffix != ".parquet":
        return read_math_jsonl(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist or is not a file")
    rows = _read_parquet(path)
    if not rows:
        raise ValueError(f"prompt file {str(path)!r} holds no items")
    return [parse_math_record(_from_verl_row(dict({"id": f"{path.stem}-{i}"}, **row)), f"{path}:row {i}")
            for i, row in enumerate(rows)]


def _from_verl_row(row: dict) -> dict:
    """verl-format rows (``prompt`` = chat messages, ``reward_model.ground_truth``) ->
    ``problem``/``answer``: the last user message, and the ground truth. Other rows pass
    through unchanged (and are validated by ``parse_math_record``).

    verl data files bake an instruction into the user message; we keep it verbatim, since
    our own prompt template may or may not add one (choose the template accordingly).
    """
    if "problem" in row or not isinstance(row.get("prompt"), list) or not isinstance(row.get("reward_model"), dict):
        return row
    users = [m["content"] for m in row["prompt"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users or "ground_truth" not in row["reward_model"]:
        return row
    return dict(row, problem=users[-1], answer=row["reward_model"]["ground_truth"])


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    return pq.read_table(path).to_pylist()


def load_prompts(paths: Sequence[str | Path], format_prompt: Callable[[str], str],
                 tokenizer: Encoder, max_prompt_len: int, *,
                 response_field: str | None = None) -> tuple[list[PromptExample], PromptStats]:
    """Format and tokenize every prompt; those longer than ``max_prompt_len`` are skipped
    and counted. Raises if no prompt is left. ``response_field``: every record must also hold
    a non-empty string there (supervised examples; kept as ``PromptExample.response``)."""
    if not paths:
        raise ValueError("no prompt files given")
    examples, total = [], 0
    for path in paths:
        for item in read_records(path):
            total += 1
            response = None
            if response_field is not None:
                response = item.extra.get(response_field)
                if not isinstance(response, str) or not response.strip():
                    raise ValueError(f"{path} id {item.id}: field {response_field!r} must be a non-empty "
                                     f"string (the supervised target), got {response!r:.80}")
            ids = tuple(int(i) for i in tokenizer.encode(format_prompt(item.problem)))
            if len(ids) <= max_prompt_len:
                examples.append(PromptExample(ids, item.answer, f"{path} id {item.id}", item.problem, response))
    if not examples:
        raise ValueError(f"all {total} prompts in {list(map(str, paths))} are longer than "
                         f"max_prompt_len={max_prompt_len} tokens")
    return examples, PromptStats(total, len(examples), total - len(examples))


def collate(examples: Sequence[PromptExample], prompt_len: int, pad_id: int) -> dict[str, Any]:
    """Left-pad to ``prompt_len``: ``prompt_ids [B,P] int32``, ``prompt_mask [B,P] bool``
    (True on real tokens), ``answers`` (str, or tuple of str for a multi-value answer),
    ``problems`` (the untemplated problem texts), ``responses`` (SFT targets, or None)."""
    ids = np.full((len(examples), prompt_len), pad_id, np.int32)
    mask = np.zeros((len(examples), prompt_len), bool)
    for i, ex in enumerate(examples):
        if len(ex.ids) > prompt_len:
            raise ValueError(f"{ex.where}: prompt of {len(ex.ids)} tokens > {prompt_len}")
        ids[i, prompt_len - len(ex.ids):] = ex.ids
        mask[i, prompt_len - len(ex.ids):] = True
    return {"prompt_ids": ids, "prompt_mask": mask, "answers": [ex.answer for ex in examples],
            "problems": [ex.problem for ex in examples], "responses": [ex.response for ex in examples]}


class PromptLoader:
    """Infinite (or ``epochs``-long) iterator of prompt batches with saveable state.

    Shuffling is seeded and different in every epoch (grain reseeds per epoch); with several
    hosts each takes examples ``shard_index::shard_count`` and batches ``batch_size`` of
    them. ``get_state()``/``set_state()`` give an exact resume. The stream is the epochs
    concatenated, then batched: a batch may span an epoch boundary, and with finite
    ``epochs`` the last partial batch is dropped.
    """

    def __init__(self, examples: Sequence[PromptExample], *, batch_size: int, prompt_len: int,
                 pad_id: int, seed: int, shuffle: bool = True, epochs: int | None = None,
                 shard_index: int = 0, shard_count: int = 1):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
        ds = grain.MapDataset.source(list(examples))[shard_index::shard_count]
        if len(ds) < batch_size:
            raise ValueError(f"{len(ds)} prompts on this shard < batch_size={batch_size}")
        self.examples_per_epoch, self.batch_size = len(ds), batch_size
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(epochs).batch(
            batch_size, drop_remainder=True,
            batch_fn=lambda exs: collate(exs, prompt_len, pad_id))
        # Synchronous reads: a batch is a gather and a pad. grain's default (16 threads, 500
        # batches prefetched) costs ~2 s to restart after set_state and buys nothing here.
        self._ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        self._it = iter(self._ds)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-safe position in the stream (store it in the checkpoint)."""
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)
