"""`llmpack eval` and `convert --eval-text`: figures equal an independent computation."""
import json

import pytest

from tiny_models import make_tiny

from llmpack.cli import main as cli_main
from llmpack.converter import convert
from llmpack.converter.quantize import calib as calib_mod
from llmpack.runtime import load

WINDOWS, CTX = 3, 24


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_tiny("qwen2", root / "ckpt")
    convert(root / "ckpt", root / "f32.llmpack", dtype="f32", quiet=True)
    convert(root / "ckpt", root / "q3.llmpack", bits=3, quiet=True)
    text = root / "text.txt"
    text.write_text(calib_mod.default_text()[100000:104000])
    return root


def _run(argv, capsys):
    code = cli_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _independent(root, ref_logits_fn, file_logits_fn):
    """Same figures from scratch: tokenizers' own tokenizer.json, torch's log_softmax / kl_div / argmax."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "ckpt" / "tokenizer.json"))
    ids = tok.encode((root / "text.txt").read_text(), add_special_tokens=False).ids
    kl, agree, nll, nll_ref = [], [], [], []
    for w in range(WINDOWS):
        win = ids[w * CTX:(w + 1) * CTX]
        lr = F.log_softmax(torch.from_numpy(ref_logits_fn(win)).double(), -1)[:-1]
        lq = F.log_softmax(torch.from_numpy(file_logits_fn(win)).double(), -1)[:-1]
        tgt = torch.tensor(win[1:])
        kl.append(F.kl_div(lq, lr, log_target=True, reduction="none").sum(-1))
        agree.append(lr.argmax(-1) == lq.argmax(-1))
        nll.append(F.nll_loss(lq, tgt, reduction="none"))
        nll_ref.append(F.nll_loss(lr, tgt, reduction="none"))
    kl, agree = torch.cat(kl), torch.cat(agree)
    return {"kld": kl.mean().item(), "top1": agree.double().mean().item(),
            "ppl": torch.cat(nll).mean().exp().item(), "ppl_ref": torch.cat(nll_ref).mean().exp().item(),
            "positions": len(kl)}


def test_eval_matches_independent_computation(packs, capsys):
    code, out, err = _run(["eval", str(packs / "q3.llmpack"), "--reference", str(packs / "f32.llmpack"),
                           "--text", str(packs / "text.txt"), "--windows", str(WINDOWS), "--ctx", str(CTX),
                           "--json", "-q"], capsys)
    assert code == 0, err
    got = json.loads(out)
    ref = load(packs / "f32.llmpack", backend="numpy")
    q = load(packs / "q3.llmpack", backend="numpy")
    want = _independent(packs, ref.logits, q.logits)
    assert got["positions"] == want["positions"] == WINDOWS * (CTX - 1)
    assert got["kld"] > 0
    for key in ("kld", "top1", "ppl", "ppl_ref"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got["ppl_ratio"] == pytest.approx(want["ppl"] / want["ppl_ref"], rel=1e-9)


def test_eval_against_itself_is_zero(packs, capsys):
    code, out, _ = _run(["eval", str(packs / "f32.llmpack"), "--reference", str(packs / "f32.llmpack"),
                         "--text", str(packs / "text.txt"), "--windows", "2", "--ctx", "16", "--json", "-q"], capsys)
    r = json.loads(out)
    assert code == 0 and r["kld"] == 0 and r["top1"] == 1 and r["ppl_ratio"] == 1


def test_eval_with_transformers_reference(packs, capsys):
    common = ["--text", str(packs / "text.txt"), "--windows", str(WINDOWS), "--ctx", str(CTX), "--json", "-q"]
    _, out_pack, _ = _run(["eval", str(packs / "q3.llmpack"), "--reference", str(packs / "f32.llmpack")] + common,
                          capsys)
    code, out_hf, err = _run(["eval", str(packs / "q3.llmpack"), "--reference", str(packs / "ckpt")] + common,
                             capsys)
    assert code == 0, err
    a, b = json.loads(out_pack), json.loads(out_hf)
    assert b["kld"] == pytest.approx(a["kld"], rel=1e-3)
    assert b["ppl_ref"] == pytest.approx(a["ppl_ref"], rel=1e-5)


def test_human_output(packs, capsys):
    code, out, _ = _run(["eval", str(packs / "q3.llmpack"), "--reference", str(packs / "f32.llmpack"),
                         "--text", str(packs / "text.txt"), "--windows", "1", "--ctx", "16", "-q"], capsys)
    assert code == 0
    assert "KLD" in out and "top-1" in out and "perplexity" in out


def test_convert_eval_text_stores_the_report(packs, tmp_path, capsys):
    out = tmp_path / "q4.llmpack"
    code, _, err = _run(["convert", str(packs / "ckpt"), "-o", str(out), "-q", "--bits", "4",
                         "--eval-text", str(packs / "text.txt"), "--eval-windows", "2", "--eval-ctx", "16"], capsys)
    assert code == 0, err
    from llmpack.formats import Pack

    pack = Pack(out)  # checksums still verify after the header was rewritten
    q = pack.header["quality"]
    assert len(q) == 1 and q[0]["reference"] == "source" and q[0]["windows"] == 2 and q[0]["ctx"] == 16
    assert q[0]["bits"] == 4 and q[0]["method"] == "rtn" and len(q[0]["text_sha256"]) == 64
    # the same figures as `llmpack eval` against the source folder
    code, js, _ = _run(["eval", str(out), "--reference", str(packs / "ckpt"), "--text", str(packs / "text.txt"),
                        "--windows", "2", "--ctx", "16", "--json", "-q"], capsys)
    assert json.loads(js)["kld"] == pytest.approx(q[0]["kld"], rel=1e-12)
    code, shown, _ = _run(["inspect", str(out)], capsys)
    assert f"KLD {q[0]['kld']:.4f} nats" in shown and "against the source on text.txt, 2 x 16 tokens" in shown


def test_convert_eval_uses_the_shipped_evaluation_text(packs, tmp_path, capsys):
    out = tmp_path / "q4.llmpack"
    code, _, err = _run(["convert", str(packs / "ckpt"), "-o", str(out), "-q", "--bits", "4", "--eval",
                         "--eval-windows", "2", "--eval-ctx", "16"], capsys)
    assert code == 0, err
    from llmpack.formats import Pack

    q = Pack(out).header["quality"][0]
    shipped = calib_mod.default_eval_path()
    assert q["text"] == "evaluation.txt" and q["windows"] == 2
    import hashlib

    assert q["text_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    # never the calibration text: no 200-character run of it appears in the evaluation text
    cal, ev = calib_mod.default_text(), shipped.read_text()
    assert not any(cal[i:i + 200] in ev for i in range(0, len(cal) - 200, 1000))


@pytest.mark.parametrize("args, expect", [
    (["--text", "/nonexistent.txt"], "does not exist"),
    (["--text", "SHORT", "--ctx", "4000"], "fewer than one window"),
    (["--text", "TEXT", "--reference", "/nonexistent.llmpack"], "does not exist"),
])
def test_eval_errors_are_one_line(packs, tmp_path, capsys, args, expect):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    args = [str(short) if a == "SHORT" else str(packs / "text.txt") if a == "TEXT" else a for a in args]
    argv = ["eval", str(packs / "q3.llmpack"), "-q"]
    if "--reference" not in args:
        argv += ["--reference", str(packs / "f32.llmpack")]
    code, _, err = _run(argv + args, capsys)
    assert code != 0 and expect in err and len(err.strip().splitlines()) == 1, err
