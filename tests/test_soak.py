"""Long sessions on the real Qwen2.5-Coder-0.5B-Instruct (q4, RTN): a 500-turn conversation through
`llmpack chat` (piped, one line per turn) and through `llmpack serve` (plain HTTP, the client
sending the whole growing conversation each turn), with the context capped (--context) so that it
overflows many times: every turn answered, old turns dropped, the prompt always within the
context, resident memory flat. And Ctrl-C in the middle of a real reply stops only that reply.

Replies are short (N_TOKENS, greedy) to keep the soak to a few minutes. Measured on 2 cores shared
with other jobs (load average ~5): chat soak 155 s, server soak 180 s, Ctrl-C 3 s (+ the one-time
fetch and q4 conversion, ~70 s, cached in $LLMPACK_CACHE); RSS chat 743 -> 743 MB, server
752 -> 753 MB from turn 50 to 500; 488 turns dropped in chat, 84% of the server's prompt tokens
came from the KV cache.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from real_models import real_pack
from test_serve import ENV, Server, request

pytestmark = pytest.mark.slow

QWEN = "qwen2.5-coder-0.5b-instruct"
TURNS = 500
CONTEXT = 256  # tokens: ~23 per turn, so the conversation overflows it every few turns
N_TOKENS = 4  # per reply
RSS_SLACK_KB = 100 << 10  # resident memory after turn 500 at most this above turn 50
STATS = re.compile(r"\[prompt (\d+) tokens: (\d+) reused from the cache, (\d+) prefilled.*?; (\d+) generated"
                   r"(?:.*?; dropped (\d+) oldest turn)?")


@pytest.fixture(scope="module")
def qwen_q4():
    return real_pack(QWEN, "f16", bits=4)


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


def message(i: int) -> str:
    return f"Fact {i}?"


def test_chat_soak_500_turns(qwen_q4, tmp_path):
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmpack", "chat", str(qwen_q4), "--context", str(CONTEXT),
                                 "-n", str(N_TOKENS), "--temperature", "0", "--stats", "--system", "Be brief."],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                encoding="utf-8", env=ENV)
        try:
            replies, rss = [], {}
            for i in range(1, TURNS + 1):
                proc.stdin.write(message(i) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                assert line.endswith("\n"), f"turn {i}: chat ended: {err_path.read_text()[-2000:]}"
                replies.append(line[:-1])
                if i in (50, TURNS):
                    rss[i] = rss_kb(proc.pid)
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stats = [tuple(int(g or 0) for g in m) for m in STATS.findall(err_path.read_text())]
    assert len(replies) == len(stats) == TURNS  # every turn answered, no error line
    assert all(s[3] >= 1 for s in stats), "a turn generated nothing"
    assert all(s[0] + N_TOKENS <= CONTEXT for s in stats)  # each prompt left room for its reply
    dropped = sum(s[4] for s in stats)
    assert dropped >= TURNS // 2  # the conversation really outgrew the context, many times
    assert sum(s[1] for s in stats) > sum(s[2] for s in stats)  # and most of each prompt came from the cache
    print(f"llmpack chat RSS: turn 50 {rss[50] >> 10} MB, turn {TURNS} {rss[TURNS] >> 10} MB; {dropped} turns dropped")
    assert rss[TURNS] - rss[50] <= RSS_SLACK_KB, rss


def test_server_soak_500_turns(qwen_q4):
    server = Server(qwen_q4, "--context", str(CONTEXT))
    try:
        messages = [{"role": "system", "content": "Be brief."}]
        rss, dropped, cached, prompt = {}, [], 0, 0
        for i in range(1, TURNS + 1):
            messages.append({"role": "user", "content": message(i)})
            status, r = request(server.url + "v1/chat/completions",
                                {"messages": messages, "max_tokens": N_TOKENS, "temperature": 0})
            assert status == 200, (i, r)
            usage = r["usage"]
            assert 1 <= usage["completion_tokens"] <= N_TOKENS
            assert usage["prompt_tokens"] + N_TOKENS <= CONTEXT
            dropped.append(usage["dropped_messages"])
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            prompt += usage["prompt_tokens"]
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            if i in (50, TURNS):
                rss[i] = server.rss_kb()
        assert request(server.url + "health")[1]["finished"]["error"] == 0
    finally:
        server.stop()
    # the conversation really outgrew the context: by the end almost all of it is dropped
    assert dropped[-1] >= 0.9 * (2 * TURNS - 1)
    assert sorted(dropped) == dropped  # a growing conversation is cut ever later, never earlier
    assert cached > prompt // 2  # the cut is kept between requests: most prompt tokens come from the cache
    print(f"llmpack serve RSS: turn 50 {rss[50] >> 10} MB, turn {TURNS} {rss[TURNS] >> 10} MB; "
          f"{cached}/{prompt} prompt tokens from the cache")
    assert rss[TURNS] - rss[50] <= RSS_SLACK_KB, rss


def test_ctrl_c_stops_only_the_reply(qwen_q4):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "llmpack", "chat", str(qwen_q4), "--context", "4096", "-n", "3000",
                                           "--temperature", "0", "--stats"],
                          env=ENV, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        # greedy, this model's story never ends (it loops): the reply runs until -n or Ctrl-C
        child.sendline("Write a long story about a dragon, at least 2000 words.")
        child.expect(r"2000 words\.\r\n")  # the echo of the line
        child.expect(r"\w")  # the reply has started
        child.sendintr()
        child.expect_exact("[reply stopped]")
        child.expect(r"\[prompt (\d+) tokens: \d+ reused from the cache, \d+ prefilled in [\d.]+s; (\d+) generated")
        first_prompt, stopped_after = int(child.match.group(1)), int(child.match.group(2))
        assert 1 <= stopped_after < 3000
        child.expect_exact(">>> ")
        child.sendline("What is the capital of France? Answer in one word.")
        child.expect(r"\[prompt (\d+) tokens: ")  # the next turn is answered, in the same conversation:
        assert int(child.match.group(1)) > first_prompt  # its prompt holds the first turn (and the partial reply)
        reply = child.before
        child.expect_exact(">>> ")
        assert "Paris" in reply
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
