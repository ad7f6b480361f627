"""Native checkpoint: Orbax-saved parameters + our ModelConfig as JSON.

    DIR/topd_model.json   {"format": "topd_jax.native/1", "config": {...ModelConfig...}}
    DIR/params/           Orbax StandardCheckpointer of the parameter dict
    DIR/hf/               (optional) the source config.json and tokenizer files, for export
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from topd_jax.models.config import ModelConfig
from topd_jax.models.qwen import Qwen
from topd_jax.sharding.rules import LOGICAL_AXIS_RULES, Rules, state_shardings

MARKER = "topd_model.json"
FORMAT = "topd_jax.native/1"


def is_native_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MARKER).is_file()


def read_native_config(directory: str | os.PathLike) -> ModelConfig:
    f = Path(directory) / MARKER
    if not f.is_file():
        raise FileNotFoundError(f"missing file {f} (not a native topd_jax checkpoint)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return ModelConfig(**meta["config"])


def save_native(model: Qwen, path: str | os.PathLike, *, hf_dir: str | os.PathLike | None = None) -> Path:
    """Save parameters (Orbax, sharded arrays welcome) and config; `hf_dir`'s config.json and
    tokenizer files are kept under DIR/hf/ so `native-to-hf` can restore them."""
    import orbax.checkpoint as ocp

    from topd_jax.checkpoints.hf import SIDECAR_FILES

    out = Path(path).absolute()
    if (out / "params").exists():
        raise FileExistsError(f"{out / 'params'} already exists; write to an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        (out / MARKER).write_text(json.dumps({"format": FORMAT, "config": dataclasses.asdict(model.config)}, indent=2))
        if hf_dir is not None:
            (out / "hf").mkdir(exist_ok=True)
            for name in ("config.json", *SIDECAR_FILES):
                if (Path(hf_dir) / name).is_file():
                    shutil.copy2(Path(hf_dir) / name, out / "hf" / name)
    return out


def load_native(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                mesh: jax.sharding.Mesh | None = None, rules: Rules = LOGICAL_AXIS_RULES) -> Qwen:
    """Restore a native checkpoint, each array straight into its target sharding and dtype."""
    import orbax.checkpoint as ocp

    directory = Path(path).absolute()
    cfg = read_native_config(directory).replace(dtype=dtype, param_dtype=param_dtype or dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0))))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              nnx.to_pure_dict(abstract))
    else:
        shardings = nnx.to_pure_dict(state_shardings(abstract, mesh, rules))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abstract), shardings)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "params", target)
    nnx.replace_by_pure_dict(abstract, _int_keys(restored))
    return nnx.merge(graphdef, abstract)


def _int_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; NNX list indices are ints."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def hf_sidecar_dir(directory: str | os.PathLike) -> Path | None:
    d = Path(directory) / "hf"
    return d if d.is_dir() else None
