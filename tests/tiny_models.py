"""Tiny random checkpoints of every supported family, built with transformers' config classes.

One shared factory (as mlx-lm's tests do): each test asks for a family and gets a saved
checkpoint folder plus the transformers model that serves as the oracle; and `stored_parts`,
for tests that compare written files tensor for tensor.
"""
from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=300, max_position_embeddings=160)
# Odd sizes on purpose (MLP width 72, 5 layers, GQA where the family has it).
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                   "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}, **COMMON)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=12, **COMMON)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, **COMMON)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(hidden_size=64, intermediate_size=72, num_hidden_layers=7, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, sliding_window=10, **COMMON)),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
                 **COMMON)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, ffn_dim=72, num_hidden_layers=3, num_attention_heads=4,
                 word_embed_proj_dim=64, **COMMON)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=160)),
}
FAMILIES = list(FAMILY_CONFIGS)


def tiny_tokenizer(folder: Path):
    """A byte-level BPE trained on a few sentences; saved as tokenizer.json with <s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model",
            "def main():\n    return 42"]
    tok.train_from_iterator(text * 20, BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def make_tiny(family: str, folder: Path, dtype: str = "float32", max_shard_size=None, seed: int = 0, **overrides):
    """Save a random tiny `family` checkpoint to `folder`; return the fp32 transformers model (eval mode)."""
    import torch
    import transformers

    cfg_name, model_name, kwargs = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cfg_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # random norm weights and biases, so those code paths are really tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    folder = Path(folder)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if dtype != "float32":
        model.to(getattr(torch, dtype)).save_pretrained(folder, **save_kwargs)
        model.float()
    else:
        model.save_pretrained(folder, **save_kwargs)
    tiny_tokenizer(folder)
    return model


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def load_hf(folder: Path):
    """The saved checkpoint loaded back by transformers in float32 (eval mode): the oracle for a
    bf16-saved folder. make_tiny's returned model went through .to(bf16).float(), which also rounds
    non-persistent buffers such as RoPE inv_freq that a real load recomputes in float32."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def stored_parts(path) -> dict:
    """A pack's tensors as written: name -> {part: bytes}, for comparing two files exactly."""
    from llmpack.formats import Pack

    p = Pack(path)
    return {n: {k: bytes(v) for k, v in p.parts(n).items()} for n in p.tensors}
