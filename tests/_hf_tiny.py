"""Tiny random Hugging Face Qwen models saved to disk, shared by the model/convert tests."""

from __future__ import annotations

import numpy as np
import torch  # the [test] extra; transformers is a dependency
import transformers

# name -> (transformers class name, config kwargs). Together they cover tied and untied
# heads, GQA ratios 2 and 4, head_dim != hidden/heads, and rope theta != 1e6.
TINY = {
    "qwen3-untied-hd24": ("Qwen3", dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=24, intermediate_size=80,
                                       tie_word_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-6)),
    "qwen3-tied-gqa4": ("Qwen3", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                     tie_word_embeddings=True, rope_theta=1e4, rms_norm_eps=1e-5)),
    "qwen2-untied": ("Qwen2", dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=80, tie_word_embeddings=False,
                                  rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen2-tied-gqa4": ("Qwen2", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True,
                                     rope_theta=2e4, rms_norm_eps=1e-6)),
}


def build_hf(name: str, seed: int = 0, randomize_norms: bool = True):
    """A random transformers model. Norm scales and biases are randomised too, so that a
    swapped or skipped norm/bias would show in the logits (HF initialises them to 1 / 0)."""
    family, kwargs = TINY[name]
    cfg = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    if randomize_norms:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference logits with positions = cumsum(mask) - 1 (our default), float32 numpy."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def padded_batch(vocab: int, lengths: list[int], total: int, side: str, seed: int = 0):
    """ids [B, total] and bool mask with len(lengths) rows padded on `side`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), total))
    mask = np.zeros((len(lengths), total), bool)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, total - n:] = True
        else:
            mask[b, :n] = True
    return ids.astype(np.int32), mask


def jitted_forward(model):
    """model(ids, attention_mask=mask) under jax.jit (eager NNX recompiles every op per shape)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask))
    return lambda ids, mask: np.asarray(fn(state, ids, mask))


def random_model(cfg, seed: int = 0, scale: float = 0.1):
    """A `Qwen` with every parameter drawn by NumPy (norm scales and biases too): built from
    the abstract model, so no per-op compilation (eager NNX init compiles each op per shape)."""
    from flax import nnx

    from topd_jax.models import Qwen

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, var):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        base = 1.0 if path[-1] == "weight" else 0.0  # norm scales around 1
        return var.replace(np.asarray(base + scale * rng.standard_normal(shape), dtype))

    return nnx.merge(graphdef, nnx.map_state(fill, state))


# Qwen3-MoE: name -> Qwen3MoeConfig kwargs. Together: a dense layer via mlp_only_layers and
# via decoder_sparse_step, both norm_topk_prob values, tied and untied heads, top-2 and top-3.
TINY_MOE = {
    "qwen3moe-norm-dense1": dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, intermediate_size=64, moe_intermediate_size=24,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                                 tie_word_embeddings=False, rope_theta=1e4, rms_norm_eps=1e-6),
    "qwen3moe-step2-tied": dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
                                tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5),
}


def build_hf_moe(name: str, seed: int = 0, router_std: float = 0.5):
    """A random transformers Qwen3MoeForCausalLM; norm scales randomised as in `build_hf`, and
    router weights drawn with std `router_std` (HF: 0.02) so that the routing is decisive:
    near-uniform router probabilities would make top-k ties, and thus parity, a coin toss."""
    cfg = transformers.Qwen3MoeConfig(**TINY_MOE[name])
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("mlp.gate.weight"):
                p.copy_(router_std * torch.randn_like(p))
    return model
