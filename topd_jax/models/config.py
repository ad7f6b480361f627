"""ModelConfig: one frozen dataclass for the Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE family, with presets.

Family differences are switches: Qwen2/2.5 put a bias on q/k/v (`qkv_bias`), Qwen3
normalises each query/key head with RMSNorm (`qk_norm`) and sets `head_dim` explicitly, and
Qwen3-MoE (`num_experts > 0`) replaces the MLP of some layers by routed experts
(`is_moe_layer`, the rule of transformers' Qwen3MoeDecoderLayer). `num_experts = 0` is dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
SUPPORTED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_IMPLS = ("ragged", "dense")  # see models/moe.py
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")  # see models/attention.py


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = True  # Qwen3
    max_position_embeddings: int = 32768
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" (see models/qwen.py)
    # attention kernel (models/attention.py): auto = cuDNN on GPU (bf16/fp16), splash on TPU,
    # chunked online-softmax otherwise; xla = the einsum with [B, N, T, S] scores in memory
    attention: str = "auto"
    attention_block_q: int = 512  # query / key block of the chunked path
    attention_block_kv: int = 512
    # ---- Qwen3-MoE (HF Qwen3MoeConfig names); num_experts = 0: every layer dense ----------
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # hidden size of each expert's SwiGLU
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    moe_impl: str = "ragged"  # "ragged" (sorted tokens, grouped matmul) | "dense" (reference)

    def __post_init__(self):
        # JSON (native checkpoints, config.json) gives a list; keep the dataclass hashable
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(int(i) for i in self.mlp_only_layers)))
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; expected one of {sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
        for field in ("attention_block_q", "attention_block_kv"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_experts:
            self._check_moe()

    def _check_moe(self):
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0 (0: dense)")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                             f"num_experts={self.num_experts}")
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be > 0 when num_experts > 0")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"mlp_only_layers={list(self.mlp_only_layers)} has layers {bad} outside "
                             f"0..num_layers-1={self.num_layers - 1}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r}; expected one of {MOE_IMPLS}")
        if self.qkv_bias or not self.qk_norm:
            raise ValueError(f"num_experts={self.num_experts} with qkv_bias={self.qkv_bias}, qk_norm={self.qk_norm}: "
                             f"MoE is supported for Qwen3-MoE only (qkv_bias=False, qk_norm=True)")

    # ---- derived -------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        """HF `model_type`: Qwen3 is the family with per-head q/k RMSNorm; Qwen3-MoE has experts."""
        if self.num_experts:
            return "qwen3_moe"
        return "qwen3" if self.qk_norm else "qwen2"

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` (0-based) routes to experts, exactly as transformers'
        Qwen3MoeDecoderLayer decides it."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, tied embeddings counted once (the published convention)."""
        return self._count_params(active=False)

    def num_active_params(self) -> int:
        """Parameters one token's forward pass uses: of each MoE layer only the router and
        num_experts_per_tok experts; embeddings and head as in `num_params` (the convention of
        the published "activated" sizes, e.g. Qwen3-30B-A3B: 3.3B). Dense: = num_params()."""
        return self._count_params(active=True)

    def _count_params(self, *, active: bool) -> int:
        d, f, h, kv, dh, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                              self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * h * dh * 2 + d * kv * dh * 2
        attn += (h * dh + 2 * kv * dh) if self.qkv_bias else 0
        attn += 2 * dh if self.qk_norm else 0
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = experts * 3 * d * self.moe_intermediate_size + self.num_experts * d  # experts + router
        mlps = sum(moe if self.is_moe_layer(i) else 3 * d * f for i in range(self.num_layers))
        return self.num_layers * (attn + 2 * d) + mlps + d + v * d * (1 if self.tie_word_embeddings else 2)

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """`ModelConfig.preset("qwen3-4b", dtype="bfloat16")`; names in `PRESETS`."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name].replace(**overrides)

    # ---- HF config.json <-> ModelConfig --------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """From a transformers `config.json` dict (Qwen2 / Qwen3 / Qwen3Moe ForCausalLM).

        Accepts both styles transformers writes: `rope_theta` + `torch_dtype` (<= 4.x) and
        `rope_parameters` + `dtype` (5.x); for Qwen3-MoE `num_experts` (hub files) or
        `num_local_experts` (what transformers 5 writes). `overrides` (e.g. dtype="bfloat16") win.
        """
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or [SUPPORTED_ARCHITECTURES.get(model_type, "")]
        if model_type not in SUPPORTED_ARCHITECTURES or archs[0] != SUPPORTED_ARCHITECTURES[model_type]:
            raise ValueError(
                f"unknown architecture: model_type={model_type!r}, architectures={hf.get('architectures')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES.values())} (dense Qwen2/2.5/3 and Qwen3-MoE)"
            )
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (full attention only)")
        if model_type in ("qwen3", "qwen3_moe") and hf.get("attention_bias", False):
            raise ValueError("Qwen3 with attention_bias=true (bias on q/k/v/o) is not supported")
        heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(_rope_theta(hf)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )
        if model_type == "qwen3_moe":
            fields.update(_moe_fields(hf))
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers `config.json` dict. Writes both rope/dtype key styles so that
        transformers 4.x, 5.x and vLLM all read it."""
        hf = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type in ("qwen3", "qwen3_moe"):
            hf["attention_bias"] = False
        if self.model_type == "qwen3_moe":
            hf.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                      output_router_logits=False, router_aux_loss_coef=0.001)
        return hf


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The Qwen3-MoE fields of a `qwen3_moe` config.json. Expert count, top-k and expert size
    are required (no silent defaults for the shapes); the layer pattern and norm_topk_prob
    default as in transformers' Qwen3MoeConfig. Shared experts (Qwen2-MoE style) are refused."""
    experts = {k: hf[k] for k in ("num_experts", "num_local_experts") if k in hf}
    if len(set(experts.values())) > 1:
        raise ValueError(f"config.json disagrees with itself: {experts}")
    missing = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if k not in hf]
    if not experts or missing:
        missing = (["num_experts"] if not experts else []) + missing
        raise ValueError(f"config.json (qwen3_moe) lacks required keys {missing}")
    if hf.get("shared_expert_intermediate_size"):
        raise ValueError(f"shared_expert_intermediate_size={hf['shared_expert_intermediate_size']}: "
                         f"shared experts are not supported (Qwen3-MoE has none)")
    return dict(num_experts=int(next(iter(experts.values()))), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope theta from either config style; anything but plain RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported (plain RoPE only)")
    if "rope_theta" in params:
        return params["rope_theta"]
    if "rope_theta" in hf:
        return hf["rope_theta"]
    return 10_000.0  # transformers' default for both Qwen2 and Qwen3 configs


def _qwen3(hidden, layers, heads, intermediate, tie, **kw) -> ModelConfig:
    base = dict(vocab_size=151936, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=8,
                head_dim=128, intermediate_size=intermediate, rope_theta=1_000_000.0, tie_word_embeddings=tie,
                qkv_bias=False, qk_norm=True, max_position_embeddings=40960)
    return ModelConfig(**{**base, **kw})


def _qwen25(hidden, layers, heads, kv_heads, intermediate, tie, vocab=151936, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                head_dim=hidden // heads, intermediate_size=intermediate, rope_theta=1_000_000.0,
                tie_word_embeddings=tie, qkv_bias=True, qk_norm=False, max_position_embeddings=32768)
    return ModelConfig(**{**base, **kw})


def _qwen3_moe(**kw) -> ModelConfig:
    """Qwen3-30B-A3B: 48 layers, all MoE, 128 experts of width 768, top-8, renormalised."""
    base = dict(vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                intermediate_size=6144, rope_theta=1_000_000.0, tie_word_embeddings=False, qkv_bias=False,
                qk_norm=True, max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
                moe_intermediate_size=768, norm_topk_prob=True)
    return ModelConfig(**{**base, **kw})


def _tiny(hidden, layers, heads, kv_heads, intermediate) -> ModelConfig:
    """The benchmark models of bench/WORKLOADS.md (random init)."""
    return _qwen3(hidden, layers, heads, intermediate, True, num_kv_heads=kv_heads, head_dim=64,
                  max_position_embeddings=4096)


# Values from each model's config.json on the Hugging Face hub. Param counts (tied
# embeddings once) are checked against the published sizes in tests/test_models_presets.py.
PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, True),
    "qwen3-4b-instruct-2507": _qwen3(2560, 36, 32, 9728, True, rope_theta=5_000_000.0,
                                     max_position_embeddings=262144),
    "qwen3-8b": _qwen3(4096, 36, 32, 12288, False),
    "qwen3-14b": _qwen3(5120, 40, 40, 17408, False),
    "qwen3-32b": _qwen3(5120, 64, 64, 25600, False),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, True),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008, True),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, False, vocab=152064),
    "qwen2.5-math-1.5b": _qwen25(1536, 28, 12, 2, 8960, True, rope_theta=10_000.0, max_position_embeddings=4096),
    "qwen2.5-math-7b": _qwen25(3584, 28, 28, 4, 18944, False, vocab=152064, rope_theta=10_000.0,
                               max_position_embeddings=4096),
    "deepseek-r1-distill-qwen-1.5b": _qwen25(1536, 28, 12, 2, 8960, False, rope_theta=10_000.0,
                                             max_position_embeddings=131072),
    "deepseek-r1-distill-qwen-7b": _qwen25(3584, 28, 28, 4, 18944, False, vocab=152064, rope_theta=10_000.0,
                                           max_position_embeddings=131072),
    # the paper's teacher; the 2507 instruct release differs only in RoPE theta and context length
    "qwen3-30b-a3b": _qwen3_moe(),
    "qwen3-30b-a3b-instruct-2507": _qwen3_moe(rope_theta=10_000_000.0, max_position_embeddings=262144),
    "tiny-student": _tiny(256, 4, 4, 2, 768),
    "tiny-teacher": _tiny(512, 6, 8, 4, 1536),
}
