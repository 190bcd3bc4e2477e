"""off_grid() from tools/get_model.py: an exact re-parametrisation of tiny random models."""
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

TOOL = Path(__file__).resolve().parents[1] / "tools" / "get_model.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("get_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


get_model = _load_tool()


def tiny_qwen2(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=200, max_position_embeddings=128,
        tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(config).eval()
    # Random init leaves norms at 1 and biases at 0, which would hide folding or
    # bias-rotation bugs: give them non-trivial values.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def input_ids(vocab=200, length=40):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [False, True])
def test_off_grid_preserves_logits(tied):
    model = tiny_qwen2(tied)
    ids = input_ids()
    before = logits(model, ids)
    embed_before = model.model.embed_tokens.weight.detach().clone()

    get_model.off_grid(model, seed=3)

    after = logits(model, ids)
    rel = (after - before).abs().max() / before.abs().max()
    assert rel < 1e-4, rel
    embed_change = (model.model.embed_tokens.weight - embed_before).abs().max()
    assert embed_change > 1e-2, embed_change  # rotated, not just re-rounded (init std is 0.02)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.all(param == 1), name


def test_off_grid_is_seeded():
    a = get_model.off_grid(tiny_qwen2(False), seed=5)
    b = get_model.off_grid(tiny_qwen2(False), seed=5)
    c = get_model.off_grid(tiny_qwen2(False), seed=6)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.allclose(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_random_orthogonal():
    q = get_model.random_orthogonal(32, seed=0)
    assert q.dtype == torch.float64
    assert torch.allclose(q.T @ q, torch.eye(32, dtype=torch.float64), atol=1e-12)


def test_off_grid_tied_model_survives_save_and_reload(tmp_path):
    # The head is untied by off_grid; the saved folder must keep both matrices
    # rather than re-tying them on load.
    model = get_model.off_grid(tiny_qwen2(tied=True), seed=0)
    ids = input_ids()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not reloaded.config.tie_word_embeddings
    assert torch.equal(logits(reloaded, ids), expected)


def test_off_grid_rejects_other_families():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(get_model.UnsupportedModelError, match="off-grid supports model types .*'gpt2'"):
        get_model.off_grid(model, seed=0)
    # Also a ValueError, for callers that don't know the tool's exception types.
    with pytest.raises(ValueError):
        get_model.off_grid(model, seed=0)
