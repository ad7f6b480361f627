"""Hugging Face directory <-> Qwen model: streamed, tensor by tensor, sharded on load.

load_hf(dir)          config.json + model.safetensors | model-*.safetensors + index -> Qwen
save_hf(model, dir)   the same layout back (what transformers and vLLM load)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from topd_jax.checkpoints.mapping import VOCAB_PATHS, TensorSpec, is_ignorable, tensor_table
from topd_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from topd_jax.models.config import DTYPES, ModelConfig
from topd_jax.models.qwen import Qwen
from topd_jax.sharding.rules import LOGICAL_AXIS_RULES, Rules, state_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Small files a serving stack needs next to the weights; copied through conversions.
SIDECAR_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def check_local_dir(path: str | os.PathLike) -> Path:
    """`path` as an existing directory, or an error that says what is wrong (hub ids included)."""
    p = Path(path)
    if p.is_dir():
        return p
    s = os.fspath(path)
    if not p.exists() and s.count("/") == 1 and not s.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{s!r} is not a local directory; if it is a Hugging Face hub id: topd_jax never downloads, "
            f"fetch the weights first (e.g. `huggingface-cli download {s} --local-dir ./{s.split('/')[1]}`) "
            f"and pass that directory."
        )
    raise FileNotFoundError(f"checkpoint directory {s!r} does not exist" if not p.exists()
                            else f"{s!r} is a file; expected a checkpoint directory")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    f = check_local_dir(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"missing file {f} (an HF checkpoint directory needs config.json)")
    return json.loads(f.read_text())


def _weight_files(directory: Path) -> dict[str, SafetensorsFile]:
    """HF tensor name -> the file that holds it."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {}
        for fname in sorted(set(weight_map.values())):
            if not (directory / fname).is_file():
                raise FileNotFoundError(f"missing file {directory / fname} (listed in {index})")
            files[fname] = SafetensorsFile(directory / fname)
        located = {}
        for name, fname in weight_map.items():
            if name not in files[fname].entries:
                raise ValueError(f"{index} puts tensor {name} in {fname}, but that file does not contain it")
            located[name] = files[fname]
        return located
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".msgpack"))
        hint = f" (found {others}: convert them to safetensors with transformers first)" if others else ""
        raise FileNotFoundError(f"missing file {directory / SINGLE_FILE}: no *.safetensors in {directory}{hint}")
    located = {}
    for p in paths:
        st = SafetensorsFile(p)
        for name in st.keys():
            located[name] = st
    return located


def _check_names(table: list[TensorSpec], located: dict[str, SafetensorsFile], cfg: ModelConfig, where: Path):
    expected = {s.hf for s in table}
    missing = [s.hf for s in table if s.hf not in located]
    unexpected = sorted(n for n in located if n not in expected and not is_ignorable(n, cfg))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"{where} does not match its config.json ({cfg.model_type}, {cfg.num_layers} layers, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings}): " + "; ".join(parts))
    for s in table:
        got = located[s.hf].shape(s.hf)
        if got != s.hf_shape:
            raise ValueError(f"tensor {s.hf} in {located[s.hf].path} has shape {got}, "
                             f"but config.json implies {s.hf_shape}")


def resize_vocab(x: np.ndarray, rows: int) -> np.ndarray:
    """Keep the first `rows` rows of an embedding/head, or append zero rows up to `rows`."""
    if x.shape[0] >= rows:
        return x[:rows]
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)], axis=0)


def place(x: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Host array -> device array in `sharding` (each device gets only its slice)."""
    if sharding is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
            mesh: jax.sharding.Mesh | None = None, rules: Rules = LOGICAL_AXIS_RULES,
            vocab_size: int | None = None) -> Qwen:
    """Load a local HF Qwen2/2.5/3 or Qwen3-MoE checkpoint into a `Qwen`, one tensor at a time
    (the experts of one MoE layer's gate/up/down: one stacked array at a time).

    dtype: compute dtype; param_dtype: storage dtype (default = dtype). mesh: place each
    tensor directly into the sharding that `rules` assign it. vocab_size: resize the
    embedding/head rows (see README "Vocabulary padding"); default: keep config.json's.
    Every name and shape is checked against config.json before any tensor data is read.
    """
    directory = check_local_dir(path)
    src_cfg = ModelConfig.from_hf_config(read_hf_config(directory))
    cfg = src_cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype,
                          vocab_size=src_cfg.vocab_size if vocab_size is None else vocab_size)
    table = tensor_table(src_cfg)
    located = _weight_files(directory)
    _check_names(table, located, src_cfg, directory)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0))))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh, rules))) if mesh is not None else {}
    variables = dict(nnx.to_flat_state(abstract))
    np_dtype = np.dtype(cfg.weight_dtype)
    for path, group in itertools.groupby(table, key=lambda s: s.path):  # the table keeps a path's rows together
        specs = list(group)
        var = variables[path]
        shape = var.get_value().shape
        if specs[0].expert is None:
            (spec,) = specs
            x = located[spec.hf].read(spec.hf)
            if path in VOCAB_PATHS:
                x = resize_vocab(x, cfg.vocab_size)
            x = spec.to_native(x, shape).astype(np_dtype)  # split heads; cast
        else:
            x = np.empty(shape, np_dtype)  # [E, in, out], filled one expert at a time
            for spec in specs:
                x[spec.expert] = spec.to_native(located[spec.hf].read(spec.hf), shape)
        sharding = shardings[path].get_value() if path in shardings else None
        var.set_value(place(x, sharding))
        del x  # at most one (stacked) tensor lives on the host at a time
    return nnx.merge(graphdef, abstract)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # every process must join the gather

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_hf(model: Qwen, path: str | os.PathLike, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
            hf_config: dict[str, Any] | None = None, copy_files_from: str | os.PathLike | None = None) -> Path:
    """Write `model` as an HF checkpoint directory (config.json + safetensors [+ index]).

    dtype: storage dtype of the written tensors (default: the model's param dtype).
    hf_config: an original config.json dict whose extra keys (token ids, ...) are kept;
    ours overrides the architecture keys. copy_files_from: a directory whose tokenizer /
    generation-config files are copied along. Tensors are fetched one at a time.
    """
    cfg = model.config
    out_dtype = dtype or cfg.param_dtype
    if out_dtype not in DTYPES:
        raise ValueError(f"dtype={out_dtype!r}; expected one of {sorted(DTYPES)}")
    np_dtype = np.dtype(DTYPES[out_dtype])
    out = Path(path)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        stale = [p.name for p in out.glob("*.safetensors")] + ([INDEX_FILE] if (out / INDEX_FILE).exists() else [])
        if stale:
            raise FileExistsError(f"{out} already holds weights {stale[:4]}; write to an empty directory")

    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = tensor_table(cfg)
    limit = _parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in table:
        nbytes = int(np.prod(spec.hf_shape)) * np_dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    by_name = {s.hf: s for s in table}

    stacked: dict[str, Any] = {}  # the one stacked expert array being written (its rows are consecutive)

    def fetch(name: str) -> np.ndarray:
        spec = by_name[name]
        if spec.expert is None:
            return spec.to_hf(_to_host(params[spec.path].get_value())).astype(np_dtype)  # fuse heads
        if stacked.get("path") != spec.path:
            stacked.clear()
            stacked.update(path=spec.path, value=_to_host(params[spec.path].get_value()))
        return spec.to_hf(stacked["value"]).astype(np_dtype)  # expert slice, transposed to [out, in]

    weight_map = {}
    for fname, shard in zip(names, shards):
        tensors = [(s.hf, s.hf_shape, np_dtype) for s in shard]
        if writer:
            write_safetensors(out / fname, tensors, fetch)
        else:
            for s in shard:  # keep the collective gathers in step with process 0
                fetch(s.hf)
        weight_map.update({s.hf: fname for s in shard})
    if not writer:
        return out
    if len(shards) > 1:
        total = sum(int(np.prod(s.hf_shape)) * np_dtype.itemsize for s in table)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    config = {k: v for k, v in (hf_config or {}).items() if k not in ("transformers_version", "_name_or_path")}
    config.update(cfg.replace(param_dtype=out_dtype).to_hf_config())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if copy_files_from is not None:
        for name in SIDECAR_FILES:
            src = Path(copy_files_from) / name
            if src.is_file():
                shutil.copy2(src, out / name)
    return out
