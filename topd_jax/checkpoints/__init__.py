"""Checkpoints: Hugging Face <-> native conversion (and, later, Orbax train state).

    model = load_pretrained("/ckpt/Qwen3-4B", dtype="bfloat16", mesh=mesh)   # HF or native dir
    save_hf(model, "/out/student-hf")          # config.json + safetensors (+ index)
    save_native(model, "/out/student-native")  # Orbax params + our config

Nothing heavy is imported until a function runs.
"""

from __future__ import annotations

import os

from topd_jax.checkpoints.hf import check_local_dir, load_hf, read_hf_config, save_hf


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                    mesh=None, **kwargs):
    """A `Qwen` from a local HF directory or a native (Orbax) checkpoint directory."""
    from topd_jax.checkpoints import native

    directory = check_local_dir(path)
    if native.is_native_dir(directory):
        return native.load_native(directory, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **kwargs)
    return load_hf(directory, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **kwargs)


def save_native(*args, **kwargs):
    from topd_jax.checkpoints import native

    return native.save_native(*args, **kwargs)


def load_native(*args, **kwargs):
    from topd_jax.checkpoints import native

    return native.load_native(*args, **kwargs)


__all__ = ["check_local_dir", "load_hf", "load_native", "load_pretrained", "read_hf_config", "save_hf",
           "save_native"]
