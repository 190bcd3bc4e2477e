"""Architectures as data: one table entry per transformers `model_type`.

Each family maps every checkpoint tensor name to a canonical llmpack name (or ignores it
explicitly) and names the rewrite applied at convert time, so the runtime has one code path.

Canonical names (i = layer index; per-layer sizes come from these tensors' shapes)::

    embed.weight (V, D)            pos_embed.weight (P, D)       final_norm.{weight,bias} (D,)
    head.{weight,bias} (V, D)      rope.<kind>.inv_freq (R/2,)
    layers.i.attn_norm.{weight,bias}       layers.i.mlp_norm.{weight,bias}
    layers.i.post_attn_norm.weight         layers.i.post_mlp_norm.weight      (sandwich norms)
    layers.i.attn.{q,k,v}.{weight,bias} (H*hd, D)   layers.i.attn.o.{weight,bias} (D, H*hd)
    layers.i.attn.{q_norm,k_norm}.weight (hd,)
    layers.i.mlp.{gate,up}.{weight,bias} (F, D)     layers.i.mlp.down.{weight,bias} (D, F)

Linear weights are stored (out_features, in_features), as torch.nn.Linear keeps them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Rewrites (applied in converter.transforms): "T" transpose a Conv1D weight; "plus1" turns
# Gemma's (1 + w) RMSNorm scale into a plain scale; "qkv" splits a fused (3D, D) projection;
# "opt_pos" drops OPT's two reserved position rows so position p reads row p.
L = r"(?P<i>\d+)"


@dataclass(frozen=True)
class Family:
    names: tuple  # (regex on the HF name, canonical template or None to ignore, rewrite or None)
    norm: str = "rms"  # "rms" or "layer"
    gated_mlp: bool = True
    parallel_block: bool = False  # attention and MLP read the same normed input (Phi-2)
    learned_pos: bool = False
    rope: bool = True
    sandwich_norms: bool = False  # Gemma-3: extra norms after attention and after the MLP
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    eps_field: str = "rms_norm_eps"
    act_field: str = "hidden_act"
    tied_default: bool = False
    window_per_layer_type: bool = False  # sliding window only on "sliding_attention" layers
    unsupported: dict = field(default_factory=dict)  # config field -> value that we refuse


def _llama_like(extra=()):
    p = rf"model\.layers\.{L}\."
    return (
        (r"model\.embed_tokens\.weight", "embed.weight", None),
        (rf"{p}self_attn\.(?P<x>[qkv])_proj\.(?P<w>weight|bias)", "layers.{i}.attn.{x}.{w}", None),
        (rf"{p}self_attn\.o_proj\.(?P<w>weight|bias)", "layers.{i}.attn.o.{w}", None),
        (rf"{p}mlp\.(?P<x>gate|up|down)_proj\.(?P<w>weight|bias)", "layers.{i}.mlp.{x}.{w}", None),
        (rf"{p}input_layernorm\.weight", "layers.{i}.attn_norm.weight", None),
        (rf"{p}post_attention_layernorm\.weight", "layers.{i}.mlp_norm.weight", None),
        (rf"{p}self_attn\.rotary_emb\.inv_freq", None, None),
        (r"model\.norm\.weight", "final_norm.weight", None),
        (r"lm_head\.weight", "head.weight", None),
    ) + tuple(extra)


_GEMMA3_P = rf"model\.layers\.{L}\."
_gemma3 = (
    (r"model\.embed_tokens\.weight", "embed.weight", None),
    (rf"{_GEMMA3_P}self_attn\.(?P<x>[qkv])_proj\.weight", "layers.{i}.attn.{x}.weight", None),
    (rf"{_GEMMA3_P}self_attn\.o_proj\.weight", "layers.{i}.attn.o.weight", None),
    (rf"{_GEMMA3_P}self_attn\.(?P<x>[qk])_norm\.weight", "layers.{i}.attn.{x}_norm.weight", "plus1"),
    (rf"{_GEMMA3_P}mlp\.(?P<x>gate|up|down)_proj\.weight", "layers.{i}.mlp.{x}.weight", None),
    (rf"{_GEMMA3_P}input_layernorm\.weight", "layers.{i}.attn_norm.weight", "plus1"),
    (rf"{_GEMMA3_P}post_attention_layernorm\.weight", "layers.{i}.post_attn_norm.weight", "plus1"),
    (rf"{_GEMMA3_P}pre_feedforward_layernorm\.weight", "layers.{i}.mlp_norm.weight", "plus1"),
    (rf"{_GEMMA3_P}post_feedforward_layernorm\.weight", "layers.{i}.post_mlp_norm.weight", "plus1"),
    (r"model\.norm\.weight", "final_norm.weight", "plus1"),
    (r"lm_head\.weight", "head.weight", None),
)

_PHI_P = rf"model\.layers\.{L}\."
_phi = (
    (r"model\.embed_tokens\.weight", "embed.weight", None),
    (rf"{_PHI_P}self_attn\.(?P<x>[qkv])_proj\.(?P<w>weight|bias)", "layers.{i}.attn.{x}.{w}", None),
    (rf"{_PHI_P}self_attn\.dense\.(?P<w>weight|bias)", "layers.{i}.attn.o.{w}", None),
    (rf"{_PHI_P}mlp\.fc1\.(?P<w>weight|bias)", "layers.{i}.mlp.up.{w}", None),
    (rf"{_PHI_P}mlp\.fc2\.(?P<w>weight|bias)", "layers.{i}.mlp.down.{w}", None),
    (rf"{_PHI_P}input_layernorm\.(?P<w>weight|bias)", "layers.{i}.attn_norm.{w}", None),
    (r"model\.final_layernorm\.(?P<w>weight|bias)", "final_norm.{w}", None),
    (r"lm_head\.(?P<w>weight|bias)", "head.{w}", None),
)

_OPT_P = rf"(?:model\.)?decoder\.layers\.{L}\."
_opt = (
    (r"(?:model\.)?decoder\.embed_tokens\.weight", "embed.weight", None),
    (r"(?:model\.)?decoder\.embed_positions\.weight", "pos_embed.weight", "opt_pos"),
    (rf"{_OPT_P}self_attn\.(?P<x>[qkv])_proj\.(?P<w>weight|bias)", "layers.{i}.attn.{x}.{w}", None),
    (rf"{_OPT_P}self_attn\.out_proj\.(?P<w>weight|bias)", "layers.{i}.attn.o.{w}", None),
    (rf"{_OPT_P}self_attn_layer_norm\.(?P<w>weight|bias)", "layers.{i}.attn_norm.{w}", None),
    (rf"{_OPT_P}final_layer_norm\.(?P<w>weight|bias)", "layers.{i}.mlp_norm.{w}", None),
    (rf"{_OPT_P}fc1\.(?P<w>weight|bias)", "layers.{i}.mlp.up.{w}", None),
    (rf"{_OPT_P}fc2\.(?P<w>weight|bias)", "layers.{i}.mlp.down.{w}", None),
    (r"(?:model\.)?decoder\.final_layer_norm\.(?P<w>weight|bias)", "final_norm.{w}", None),
    (r"lm_head\.weight", "head.weight", None),
)

_GPT2_P = rf"(?:transformer\.)?h\.{L}\."
_gpt2 = (
    (r"(?:transformer\.)?wte\.weight", "embed.weight", None),
    (r"(?:transformer\.)?wpe\.weight", "pos_embed.weight", None),
    (rf"{_GPT2_P}ln_1\.(?P<w>weight|bias)", "layers.{i}.attn_norm.{w}", None),
    (rf"{_GPT2_P}ln_2\.(?P<w>weight|bias)", "layers.{i}.mlp_norm.{w}", None),
    (rf"{_GPT2_P}attn\.c_attn\.(?P<w>weight|bias)", "layers.{i}.attn.{{q,k,v}}.{w}", "qkv"),
    (rf"{_GPT2_P}attn\.c_proj\.(?P<w>weight|bias)", "layers.{i}.attn.o.{w}", "T"),
    (rf"{_GPT2_P}mlp\.c_fc\.(?P<w>weight|bias)", "layers.{i}.mlp.up.{w}", "T"),
    (rf"{_GPT2_P}mlp\.c_proj\.(?P<w>weight|bias)", "layers.{i}.mlp.down.{w}", "T"),
    (rf"{_GPT2_P}attn\.(?:masked_)?bias", None, None),  # causal-mask buffers of old checkpoints
    (r"(?:transformer\.)?ln_f\.(?P<w>weight|bias)", "final_norm.{w}", None),
    (r"lm_head\.weight", "head.weight", None),
)

FAMILIES: dict[str, Family] = {
    "llama": Family(_llama_like()),
    "mistral": Family(_llama_like(), window_per_layer_type=False),
    "qwen2": Family(_llama_like(), window_per_layer_type=True),
    "gemma3_text": Family(_gemma3, sandwich_norms=True, embed_scale=True, act_field="hidden_activation",
                          tied_default=True, window_per_layer_type=True,
                          unsupported={"attn_logit_softcapping": "not None"}),
    "phi": Family(_phi, norm="layer", gated_mlp=False, parallel_block=True, eps_field="layer_norm_eps",
                  unsupported={"qk_layernorm": True}),
    "opt": Family(_opt, norm="layer", gated_mlp=False, learned_pos=True, rope=False, eps_field=None,
                  act_field="activation_function", tied_default=True,
                  unsupported={"do_layer_norm_before": False, "_proj_dim_differs": True}),
    "gpt2": Family(_gpt2, norm="layer", gated_mlp=False, learned_pos=True, rope=False,
                   eps_field="layer_norm_epsilon", act_field="activation_function", tied_default=True,
                   unsupported={"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}),
}

# HF activation names -> the runtime's four kernels.
ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu",
}


def map_name(family: Family, hf_name: str):
    """HF tensor name -> (canonical name or None for ignored, rewrite); KeyError if unmapped."""
    for pattern, template, rewrite in family.names:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return (template.format(**m.groupdict()) if template else None), rewrite
    raise KeyError(hf_name)
