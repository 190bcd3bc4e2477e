"""config.json + family table -> the canonical model description the runtime executes.

The runtime never reads HF config fields: everything it needs is normalized here, and
RoPE inverse frequencies are precomputed as tensors (one per distinct rope kind).
"""
from __future__ import annotations

import numpy as np

from llmpack.formats.errors import LlmpackError

from .arch import ACTIVATIONS, FAMILIES, Family

SUPPORTED = ", ".join(sorted(FAMILIES))


def family_for(config_dict: dict) -> tuple[str, Family]:
    mt = config_dict.get("model_type")
    if mt not in FAMILIES:
        raise LlmpackError(f"unsupported model_type {mt!r}; llmpack converts: {SUPPORTED}")
    return mt, FAMILIES[mt]


def load_config(ckpt):
    """transformers' config object: fills in each family's defaults for fields the file omits."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(ckpt.dir))
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise LlmpackError(f"{ckpt.dir}/config.json: transformers cannot read it ({e})".splitlines()[0])


def _check_unsupported(mt, fam: Family, cfg):
    for field, bad in fam.unsupported.items():
        if field == "_proj_dim_differs":
            if getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) != cfg.hidden_size:
                raise LlmpackError(f"{mt}: word_embed_proj_dim != hidden_size (project_in/out) is not supported")
            continue
        val = getattr(cfg, field, None)
        if (bad == "not None" and val is not None) or (bad != "not None" and val == bad):
            raise LlmpackError(f"{mt}: config {field}={val!r} is not supported by llmpack yet")


def _rope_kinds(mt, cfg) -> dict[str, dict]:
    """rope kind name -> its rope parameters (Gemma-3 has one per layer type)."""
    params = getattr(cfg, "rope_parameters", None) or {"rope_type": "default",
                                                        "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    layer_types = getattr(cfg, "layer_types", None) or []
    if layer_types and all(lt in params for lt in set(layer_types)):
        return {lt: params[lt] for lt in sorted(set(layer_types))}
    return {"global": params}


def rope_tables(cfg, kind: str, params: dict, rotary_dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq (rotary_dim/2,), attention scaling) computed exactly as transformers does."""
    import torch

    rtype = params.get("rope_type", "default")
    if rtype == "default":
        base = params["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        return inv.numpy().astype(np.float32), 1.0
    if rtype in ("dynamic", "longrope"):
        raise LlmpackError(f"rope_type {rtype!r} depends on the sequence length and is not supported yet")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rtype not in ROPE_INIT_FUNCTIONS:
        raise LlmpackError(f"unknown rope_type {rtype!r}")
    layer_type = None if kind == "global" else kind
    inv, scaling = ROPE_INIT_FUNCTIONS[rtype](cfg, None, layer_type=layer_type)
    return inv.float().numpy(), float(scaling)


def describe(mt: str, fam: Family, cfg, has_head: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (model description, extra tensors such as RoPE tables)."""
    _check_unsupported(mt, fam, cfg)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    act_name = getattr(cfg, fam.act_field)
    if act_name not in ACTIVATIONS:
        raise LlmpackError(f"{mt}: activation {act_name!r} is not supported ({', '.join(ACTIVATIONS)})")
    eps = getattr(cfg, fam.eps_field) if fam.eps_field else 1e-5  # OPT uses nn.LayerNorm's default
    n_layers = cfg.num_hidden_layers
    tied = bool(getattr(cfg, "tie_word_embeddings", fam.tied_default))
    if not tied and not has_head:
        raise LlmpackError(f"{mt}: config says the head is untied but the checkpoint has no lm_head.weight")

    extra: dict[str, np.ndarray] = {}
    layers = [{} for _ in range(n_layers)]
    rope_scaling = {}
    rotary_dim = 0
    if fam.rope:
        kinds = _rope_kinds(mt, cfg)
        # transformers 5 keeps partial_rotary_factor inside rope_parameters; older configs at top level.
        factor = (next(iter(kinds.values())).get("partial_rotary_factor")
                  or getattr(cfg, "partial_rotary_factor", None) or 1.0)
        rotary_dim = int(head_dim * factor)
        for kind, params in kinds.items():
            inv, scaling = rope_tables(cfg, kind, params, rotary_dim)
            extra[f"rope.{kind}.inv_freq"] = inv
            rope_scaling[kind] = scaling
        layer_types = getattr(cfg, "layer_types", None)
        for i, layer in enumerate(layers):
            # Kinds keyed by layer type (Gemma-3) even when every kept layer has the same type:
            # a 3-layer all-sliding model has only "sliding_attention" tables.
            layer["rope"] = layer_types[i] if "global" not in kinds else "global"

    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    for i, layer in enumerate(layers):
        if fam.window_per_layer_type:
            sliding = bool(layer_types) and layer_types[i] == "sliding_attention"
            layer["window"] = window if sliding else None
        else:
            layer["window"] = window if mt == "mistral" else None

    scale = head_dim ** -0.5
    if getattr(cfg, "query_pre_attn_scalar", None):
        scale = cfg.query_pre_attn_scalar ** -0.5
    model = {
        "family": mt,
        "norm": fam.norm,
        "norm_eps": float(eps),
        "act": ACTIVATIONS[act_name],
        "gated_mlp": fam.gated_mlp,
        "parallel_block": fam.parallel_block,
        "sandwich_norms": fam.sandwich_norms,
        "head_dim": head_dim,
        "rotary_dim": rotary_dim,
        "rope_scaling": rope_scaling,
        "attn_scale": scale,
        "embed_scale": float(cfg.hidden_size ** 0.5) if fam.embed_scale else None,
        "learned_pos": fam.learned_pos,
        "final_softcap": getattr(cfg, "final_logit_softcapping", None),
        "context_length": int(getattr(cfg, "max_position_embeddings", 2048)),
        "tied_head": tied,
        "n_layers": n_layers,
        "layers": layers,
    }
    return model, extra
