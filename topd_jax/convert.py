"""Convert checkpoints between Hugging Face and native (Orbax) formats.

    python -m topd_jax.convert hf-to-native SRC_HF_DIR DST
    python -m topd_jax.convert native-to-hf SRC DST_HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]

Both directions stream tensor by tensor and keep the stored dtype unless --dtype says
otherwise, so HF -> native -> HF reproduces the original tensors exactly. Weights must be
local: a hub id is refused (nothing is downloaded).

Exit status (``topd_jax.cli_common``): 0 written; 2 bad flag or input (a missing source, a
hub id, a destination that already holds a checkpoint, a malformed checkpoint); 1 a failure
while writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from topd_jax.cli_common import UsageError, add_log_level, run_command, setup_logging

DESCRIPTION = __doc__


def _hf_to_native(args) -> None:
    from topd_jax.checkpoints import load_hf, read_hf_config, save_native

    hf_cfg = read_hf_config(args.src)
    dtype = args.dtype or _stored_dtype(hf_cfg)
    model = load_hf(args.src, dtype=dtype, param_dtype=dtype)
    out = save_native(model, args.dst, hf_dir=args.src)
    print(f"wrote native checkpoint {out} ({model.config.model_type}, {model.config.num_layers} layers, {dtype})")


def _native_to_hf(args) -> None:
    from topd_jax.checkpoints import native, save_hf

    cfg = native.read_native_config(args.src)
    dtype = args.dtype or cfg.param_dtype
    model = native.load_native(args.src, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    sidecar = native.hf_sidecar_dir(args.src)
    base = json.loads((sidecar / "config.json").read_text()) if sidecar and (sidecar / "config.json").is_file() else None
    out = save_hf(model, args.dst, dtype=dtype, max_shard_size=args.max_shard_size, hf_config=base,
                  copy_files_from=sidecar)
    print(f"wrote HF checkpoint {out} ({dtype})")


def _stored_dtype(hf_cfg: dict) -> str:
    """The checkpoint's own dtype from config.json (`dtype`, or older `torch_dtype`)."""
    name = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m topd_jax.convert", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-native", help="HF directory (config.json + *.safetensors) -> native Orbax checkpoint")
    a.add_argument("src", type=Path, help="local HF checkpoint directory")
    a.add_argument("dst", type=Path, help="output directory (created; must not hold a checkpoint)")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype to store (default: the checkpoint's own dtype)")
    a.set_defaults(run=_hf_to_native)
    b = sub.add_parser("native-to-hf", help="native checkpoint -> HF directory that transformers / vLLM load")
    b.add_argument("src", type=Path, help="native checkpoint directory (has topd_model.json)")
    b.add_argument("dst", type=Path, help="output HF directory (created; must not hold weights)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: the stored parameter dtype)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    b.set_defaults(run=_native_to_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:  # reading the source and checking the destination: bad input
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise UsageError(e) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
