"""Chat templates (parity with transformers' apply_chat_template, sandbox) and `llmpack chat`.

The command runs in a subprocess on tiny model packs: piped stdin (one reply line per message,
/reset, context overflow, greedy replies equal to transformers' generate on the same rendered
prompts) and a pseudo-terminal (Ctrl-C stops a reply and returns to the prompt).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_tokenizer import REAL, bpe_folder, hf_tokenizer, real_tokenizers, runtime_tokenizer, sp_folder
from tiny_models import make_tiny

# Qwen2.5's template (ChatML), as shipped in its chat_template.jinja.
QWEN_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Gemma-3 style: bos_token, the system prompt folded into the first user turn, role checks.
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

HISTORY = [
    {"role": "system", "content": "You are a terse assistant. Über-short answers ✓."},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "  hi there!  \n"},
    {"role": "user", "content": "def main():\n    return 42 — what does it do? 日本語 😀"},
    {"role": "assistant", "content": "It returns 42."},
    {"role": "user", "content": "and the quick brown fox?"},
]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
STOP_TEXTS = ("</s>", "<|im_end|>")


# -- templates ----------------------------------------------------------------------------------
def _template_folder(tmp_path, template):
    folder = bpe_folder(tmp_path / "tok")
    tok = hf_tokenizer(folder)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_template_parity_with_transformers(name, tmp_path):
    from llmpack.runtime import chat_template

    folder = _template_folder(tmp_path, QWEN_TEMPLATE if name == "qwen" else GEMMA_TEMPLATE)
    rt, section = runtime_tokenizer(folder)
    hf = hf_tokenizer(folder)
    assert section["chat_template"] == hf.chat_template
    for n in (2, 4, 6):  # growing multi-turn histories with the system prompt
        msgs = HISTORY[:n]
        if name == "gemma" and n % 2 == 1:
            continue
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            got = chat_template.render(section["chat_template"], msgs, section["special"], add_generation_prompt=gen)
            assert got == want
            assert rt.encode(got, add_special_tokens=False) == hf.apply_chat_template(
                msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
    if name == "gemma":
        assert got.startswith("<s><start_of_turn>user\nYou are a terse")  # bos_token is a template variable
    # without a system prompt, Qwen's template writes its default one
    assert chat_template.render(section["chat_template"], HISTORY[1:2], section["special"]) == \
        hf.apply_chat_template(HISTORY[1:2], tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_template_parity(name):
    from llmpack.runtime import chat_template

    from real_models import real_model

    folder = real_model(REAL[name])
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file() and not (folder / "chat_template.jinja").is_file() and "chat_template" not in cfg.read_text():
        pytest.skip(f"{folder} has no chat template")
    rt, section, hf = real_tokenizers(name)
    assert section["chat_template"] == hf.chat_template
    for n in (2, 4, 6):
        want = hf.apply_chat_template(HISTORY[:n], tokenize=False, add_generation_prompt=True)
        got = chat_template.render(section["chat_template"], HISTORY[:n], section["special"])
        assert got == want
        assert rt.encode(got, add_special_tokens=False) == hf(want, add_special_tokens=False).input_ids


def test_template_helpers_match_transformers(tmp_path):
    from llmpack.runtime import chat_template

    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% if loop.index > 9 %}{% break %}{% endif %}{% endfor %}"
                "|{{ ns.n }}|{{ dict(a=1) | tojson(indent=2) }}|{{ strftime_now('%Y') }}|{{ eos_token }}|{{ tools is none }}"
                "{% generation %}<gen>{% endgeneration %}{% if add_generation_prompt %}GO{% endif %}")
    folder = _template_folder(tmp_path, template)
    _, section = runtime_tokenizer(folder)
    msgs = HISTORY + [{"role": "user", "content": "<b>&'\"</b>", "name": None}]
    want = hf_tokenizer(folder).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat_template.render(template, msgs, section["special"]) == want
    assert "<b>&" in want and "日本語" in want  # tojson: no HTML escaping, no ASCII escaping


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% set ns = namespace(__init__=1) %}x",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.append(1) }}",
])
def test_template_sandbox_refuses_escapes(evil):
    from llmpack.runtime import chat_template

    with pytest.raises(chat_template.TemplateError, match="sandbox|undefined|unsafe|forbid") as e:
        chat_template.render(evil, HISTORY, {"eos_token": "</s>"})
    assert "pwned" not in str(e.value) and "subclasses" not in str(e.value).lower().replace("__subclasses__", "")


def test_template_raise_exception_is_a_clear_error():
    from llmpack.runtime import chat_template

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(chat_template.TemplateError, match="roles must alternate"):
        chat_template.render(GEMMA_TEMPLATE, bad, {"bos_token": "<s>"})
    with pytest.raises(chat_template.TemplateError, match="does not parse"):
        chat_template.render("{% for %}", bad, {})


# -- tiny chat models --------------------------------------------------------------------------
def _chat_pack(folder: Path, template=QWEN_TEMPLATE, family="qwen2", silence_stop=False, **overrides):
    """A tiny random model with the ChatML specials and `template`, converted to f32."""
    from llmpack.converter import convert

    model = make_tiny(family, folder / "ckpt", **overrides)
    bpe_folder(folder / "ckpt")  # adds <|im_start|>, <|im_end|>
    tok = hf_tokenizer(folder / "ckpt")
    tok.chat_template = template
    tok.save_pretrained(folder / "ckpt")
    if silence_stop:  # a head row of zeros: logit 0, never the argmax -> greedy replies never end early
        import torch

        stop = [tok.convert_tokens_to_ids(t) for t in STOP_TEXTS] + [model.generation_config.eos_token_id or 0]
        with torch.no_grad():
            model.lm_head.weight[stop] = 0
        model.save_pretrained(folder / "ckpt")
    convert(folder / "ckpt", folder / "m.llmpack", dtype="f32", quiet=True)
    return model, folder / "m.llmpack"


@pytest.fixture(scope="module")
def chat_pack(tmp_path_factory):
    # llama, seed 0: greedy replies that vary (and hold invalid UTF-8 byte sequences: a decode stress test)
    return _chat_pack(tmp_path_factory.mktemp("chat"), family="llama", max_position_embeddings=512)


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory):  # a context of 96 tokens: a few turns overflow it
    return _chat_pack(tmp_path_factory.mktemp("small"), max_position_embeddings=96)[1]


def run_chat(pack, lines, *args, timeout=120):
    """`llmpack chat` with piped stdin; returns (reply lines unescaped, stderr)."""
    from llmpack.runtime.cmd_chat import unescape_line

    p = subprocess.run([sys.executable, "-m", "llmpack", "chat", str(pack), *args], input="".join(
        line + "\n" for line in lines), capture_output=True, text=True, encoding="utf-8", timeout=timeout, env=ENV)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("\n") or not p.stdout
    return [unescape_line(x) for x in p.stdout.split("\n")[:-1]], p.stderr


def _stats(stderr):
    return [tuple(map(int, m)) for m in re.findall(r"\[prompt (\d+) tokens: (\d+) reused from the cache, (\d+) prefilled",
                                                   stderr)]


def test_pipe_one_reply_per_message_and_reset(chat_pack):
    _, pack = chat_pack
    msgs = ["hello world", "", "the quick brown fox", "/reset", "hello world", "def main():"]
    replies, err = run_chat(pack, msgs, "-n", "6", "--stats", "--system", "be brief", "--backend", "numpy")
    assert len(replies) == 4, (replies, err)  # blank lines and /reset are not messages
    stats = _stats(err)
    assert len(stats) == 4
    # after /reset the conversation restarts: same prompt and same greedy reply as the first turn
    assert stats[2][0] == stats[0][0] and replies[2] == replies[0]
    assert stats[1][0] > stats[0][0] and stats[3][0] > stats[2][0]  # history grows between resets
    assert stats[1][1] > 0 and stats[2][1] > 0  # the KV cache served the shared prefixes


def test_greedy_replies_match_transformers_generate(chat_pack):
    from llmpack.runtime import load

    model, pack = chat_pack
    user = ["hello world", "the quick brown fox jumps over", "def main(): return 42"]
    system = "You are a tiny model."
    replies, err = run_chat(pack, user, "-n", "16", "--system", system, "--temperature", "0", "--stats")
    assert len(replies) == 3 and any(r.strip() for r in replies)
    rt = load(pack)
    hf = hf_tokenizer(pack.parent / "ckpt")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user[0]}]
    assert rt.chat_ids(msgs) == hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False)
    assert replies == _hf_replies(model, hf, sorted(rt.stop_ids), system, user, replies, 16)
    assert all(reused > 0 for _, reused, _ in _stats(err)[1:])  # turns 2 and 3 ran on the re-used cache


def _hf_replies(model, hf, stop, system, user, replies, n):
    """transformers' greedy replies on the same conversation (each turn given our previous replies)."""
    import torch

    msgs = [{"role": "system", "content": system}]
    out_texts = []
    for u, reply in zip(user, replies):
        msgs.append({"role": "user", "content": u})
        ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop,
                                 pad_token_id=stop[0])[0, len(ids):].tolist()
        if out and out[-1] in stop:
            out = out[:-1]
        out_texts.append(hf.decode(out, skip_special_tokens=True))
        msgs.append({"role": "assistant", "content": reply})
    return out_texts


def test_sentencepiece_pack_chat_matches_transformers(tmp_path):
    """A Gemma-style checkpoint whose folder has only tokenizer.model, end to end through convert."""
    from llmpack.converter import convert
    from llmpack.runtime import load

    ckpt = tmp_path / "ckpt"
    model = make_tiny("gemma3_text", ckpt, vocab_size=448)
    (ckpt / "tokenizer.json").unlink()
    sp_folder(ckpt, "GemmaTokenizer", add_dummy_prefix=False, add_bos_token=True)
    (ckpt / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    convert(ckpt, tmp_path / "m.llmpack", dtype="f32", quiet=True)
    rt = load(tmp_path / "m.llmpack")
    assert rt.header["tokenizer"]["kind"] == "sentencepiece"
    user = ["hello world 😀", "日本語 the quick brown fox"]
    replies, _ = run_chat(tmp_path / "m.llmpack", user, "-n", "12", "--system", "be brief", "--temperature", "0")
    assert len(replies) == 2 and any(r.strip() for r in replies), replies
    hf = hf_tokenizer(ckpt)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": user[0]}]
    assert rt.chat_ids(msgs) == hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False)
    assert replies == _hf_replies(model, hf, sorted(rt.stop_ids), "be brief", user, replies, 12)


def test_cache_reuse_saves_prefill_and_changes_nothing(chat_pack):
    from llmpack.runtime import load
    from llmpack.runtime.cmd_chat import ChatSession

    rt = load(chat_pack[1])
    user = ["hello world", "the quick brown fox", "this is a tiny model", "hello again"]
    reuse = ChatSession(rt, "You are a tiny model.", 12, {"temperature": 0.0})
    replies, prefilled, prompt, previous = [], 0, 0, 0
    for u in user:
        replies.append("".join(reuse.send(u)))
        last = reuse.last
        # at least the whole previous prompt comes from the cache; the previous reply too where its text
        # re-tokenizes to the generated tokens (a random model's invalid UTF-8 does not)
        assert last["dropped_turns"] == 0 and last["reused"] >= previous
        previous = last["prompt_tokens"]
        prefilled += last["prefilled"]
        prompt += last["prompt_tokens"]
    fresh_replies = []
    for i, u in enumerate(user):  # the same conversation, every turn prefilled from scratch
        fresh = ChatSession(rt, "You are a tiny model.", 12, {"temperature": 0.0})
        fresh.messages += [m for pair in zip([{"role": "user", "content": x} for x in user[:i]],
                                             [{"role": "assistant", "content": r} for r in replies[:i]]) for m in pair]
        fresh_replies.append("".join(fresh.send(u)))
        assert fresh.last["reused"] == 0
    assert fresh_replies == replies
    # only the first prompt is prefilled in full; later turns prefill just the new tokens
    assert prefilled < prompt / 2, (prefilled, prompt)
    print(f"cache reuse: prefilled {prefilled} of {prompt} prompt tokens over {len(user)} turns")


def test_stopped_reply_stays_in_history_as_shown(chat_pack):
    from llmpack.runtime import load
    from llmpack.runtime.cmd_chat import ChatSession

    rt = load(chat_pack[1])
    session = ChatSession(rt, "be brief", 40, {"temperature": 0.0})
    reply = session.send("hello world")
    shown = [next(reply), next(reply)]
    reply.close()  # what the CLI does on Ctrl-C
    assert session.last["interrupted"] and session.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    "".join(session.send("the quick brown fox"))
    assert session.last["reused"] >= len(rt.chat_ids(session.messages[:2])) - 1  # the cache stayed usable
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_context_overflow_drops_oldest_turns(small_pack):
    from llmpack.runtime import load
    from llmpack.runtime.cmd_chat import ChatSession

    msgs = ["hello world the quick brown fox", "this is a tiny model", "def main(): return 42", "jumps over the lazy dog",
            "hello world, this is a tiny model", "the quick brown fox", "x " * 200, "hello"]
    replies, err = run_chat(small_pack, msgs, "-n", "8", "--system", "be brief", "--stats")
    assert len(replies) == len(msgs)  # the over-long message gets an empty line and a note on stderr
    assert replies[6] == "" and "too long" in err
    assert "dropped" in err
    rt = load(small_pack)
    session = ChatSession(rt, "be brief", 8, {"temperature": 0.0})
    dropped = 0
    for m in msgs[:6]:
        "".join(session.send(m))
        dropped += session.last["dropped_turns"]
        assert session.messages[0] == {"role": "system", "content": "be brief"}
        assert session.last["prompt_tokens"] + min(8, rt.context_length // 2) <= rt.context_length
    assert dropped > 0 and session.messages[1]["role"] == "user"


def test_fit_conversation_drops_the_fewest_turns_to_half_the_room(chat_pack):
    from llmpack.runtime import load
    from llmpack.runtime.history import TooLong, fit_conversation

    rt = load(chat_pack[1])  # a context of 512 tokens; a turn renders to ~25
    system = {"role": "system", "content": "be brief"}
    history = [system]
    for i in range(30):
        history += [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "yes"})
    before = [dict(m) for m in history]
    reserve = 8
    fitted = fit_conversation(rt, history, reserve)
    assert history == before  # the caller's list is not changed
    half = (rt.context_length - reserve) // 2
    k, d = fitted.dropped_turns, fitted.dropped_messages
    assert 0 < k < 30 and d == 2 * k and fitted.messages == [system] + history[1 + d:]
    assert fitted.ids == rt.chat_ids(fitted.messages) and len(fitted.ids) <= half
    assert len(rt.chat_ids([system] + history[1 + d - 2:])) > half  # one turn fewer dropped would not do
    # a hint: the cut of an earlier request, kept while it fits (not re-cut to half)
    grown = history + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    again = fit_conversation(rt, grown, reserve, drop_hint=d)
    assert again.dropped_messages == d and again.dropped_turns == k
    assert len(again.ids) + reserve <= rt.context_length and len(again.ids) > len(fitted.ids)
    # nothing to drop: a short conversation runs whole; a last message too long alone is refused
    assert fit_conversation(rt, history[:3] + history[-1:], reserve).dropped_turns == 0
    with pytest.raises(TooLong, match="too long"):
        fit_conversation(rt, history + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "x " * 600}],
                         reserve)


def test_context_option_caps_the_context(chat_pack):
    msgs = [f"hi {i}" for i in range(8)]
    replies, err = run_chat(chat_pack[1], msgs, "-n", "4", "--context", "200", "--stats", "--backend", "numpy")
    stats = _stats(err)
    assert len(replies) == len(stats) == len(msgs) and "dropped" in err  # 512 tokens would hold them all
    assert all(p + 4 <= 200 for p, _, _ in stats)
    p = subprocess.run([sys.executable, "-m", "llmpack", "chat", str(chat_pack[1]), "--context", "1"], input="hi\n",
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "--context" in p.stderr


def test_help_shows_an_example():
    p = subprocess.run([sys.executable, "-m", "llmpack", "chat", "--help"], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0
    assert "printf" in p.stdout and "llmpack chat qwen05.llmpack" in p.stdout and "/reset" in p.stdout


def test_bad_template_is_a_one_line_error(tmp_path):
    _, pack = _chat_pack(tmp_path, template="{{ ''.__class__.__mro__ }}")
    p = subprocess.run([sys.executable, "-m", "llmpack", "chat", str(pack)], input="hi\n", capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert p.stdout == "\n" and "sandbox" in p.stderr and "Traceback" not in p.stderr


# -- terminal -----------------------------------------------------------------------------------
def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    # long context and stop tokens that greedy decoding never picks: the reply runs for seconds
    _, pack = _chat_pack(tmp_path, family="llama", silence_stop=True, max_position_embeddings=4096)
    child = pexpect.spawn(sys.executable, ["-m", "llmpack", "chat", str(pack), "-n", "4000", "--temperature", "0",
                                             "--backend", "numpy"],
                          env=ENV, encoding="utf-8", timeout=30, dimensions=(40, 200),
                          # started with SIGINT ignored, as a background job of a non-interactive shell
                          # is: chat must still stop on Ctrl-C (it once inherited SIG_IGN and did not)
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        child.expect_exact(">>> ")
        # Ctrl-C must not flush the terminal's output: the driver signals first and flushes second,
        # so a fast "[reply stopped]" could be discarded (the race this test once lost under load)
        import termios

        assert termios.tcgetattr(child.child_fd)[3] & termios.NOFLSH
        child.sendline("hello world")
        child.expect(r"hello world\r\n")  # the echo of the line
        child.expect(r"\S")  # the first piece of the reply
        child.sendintr()  # Ctrl-C typed into the terminal
        child.expect_exact("[reply stopped]", timeout=30)
        child.expect_exact(">>> ", timeout=30)
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt does not quit either
        child.expect_exact("/exit")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF, timeout=10)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# -- hostile templates: bounded, one clear error each ---------------------------------------------
HOSTILE = {
    "nested range loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           "more than 1,000,000 loop iterations"),
    "a huge string": ("{{ 'a' * 10**8 }}", "builds a string or list of 100,000,000"),
    "a huge range": ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "range(1000000000) of 1,000,000,000 numbers"),
    "a huge width": ("{{ 'a'|center(1000000000) }}", "passes the number 1000000000"),
    "a huge format width": ("{{ '{:>1000000000}'.format(1) }}", "width of a million"),
    "a huge % width": ("{{ '%01000000000d' % 1 }}", "width of a million"),
    "a huge join": ("{{ range(100000)|join('x' * 1000000) }}", "builds a string or list"),
    "a huge replace": ("{{ ('a' * 1000000).replace('', 'bbbbbbbb') }}", "builds a string or list of 9,000,008"),
    "doubling with +": ("{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}"
                        "{% endfor %}", "builds a string or list of 8,388,608"),
    "doubling with ~": ("{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
                        "{% endfor %}", "produced more than"),
    "a huge captured block": ("{% set b = 'a' * 4000000 %}{% set x %}{% for i in range(1000) %}{{ b }}{% endfor %}"
                              "{% endset %}", "produced more than"),
    "a huge output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed 4,194,304"),
    "a huge power": ("{{ 7 ** 100000 }}", "a number with bits"),
    "endless recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    "a type error": ("{{ 1 + 'a' }}", "failed to render: TypeError"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_stop_with_one_clear_error(name):
    from llmpack.runtime import chat_template

    template, words = HOSTILE[name]
    with pytest.raises(chat_template.TemplateError, match=re.escape(words)) as e:
        chat_template.render(template, HISTORY, {"eos_token": "</s>"})
    assert "\n" not in str(e.value)
    # the next render of a good template is unaffected (the bounds are per render)
    assert chat_template.render(QWEN_TEMPLATE, HISTORY, {}).startswith("<|im_start|>system")


def test_template_render_time_is_bounded(monkeypatch):
    """The wall-clock bound (set to 0 here so the test does not depend on the machine's speed)."""
    from llmpack.runtime import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.0)
    with pytest.raises(chat_template.TemplateError, match="took more than 0 s to render"):
        chat_template.render("{% for i in range(1000) %}{{ i }}{% endfor %}", HISTORY, {})


def test_oversized_template_is_refused_before_parsing():
    from llmpack.runtime import chat_template

    big = "x" * (chat_template.MAX_TEMPLATE_CHARS + 1)
    with pytest.raises(chat_template.TemplateError, match="131,073 characters .*refused unparsed"):
        chat_template.render(big, HISTORY, {})


def test_a_hostile_template_leaves_the_chat_session_running(tmp_path):
    _, pack = _chat_pack(tmp_path, template="{{ 'a' * 10**8 }}")
    replies, err = run_chat(pack, ["hi", "/reset", "hello world"], "-n", "2", "--backend", "numpy", timeout=120)
    assert replies == ["", ""]  # one (empty) line per message, exit 0
    assert err.count("builds a string or list of 100,000,000") == 2 and "Traceback" not in err
