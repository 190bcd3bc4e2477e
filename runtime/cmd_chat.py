"""llmpack chat FILE — multi-turn chat in the model's own chat template, streaming the replies.

On a terminal: a prompt with line editing and history (readline). /reset forgets the
conversation (the --system prompt stays), /exit or Ctrl-D quits, Ctrl-C stops the reply being
written and returns to the prompt. The stopped, partial reply stays in the history, exactly as
far as it was shown, so the conversation the model sees is the one you saw (and roles keep
alternating, which many templates require).

With standard input not a terminal (a pipe or a file): every input line is one user message,
taken verbatim; blank lines are skipped and the lines /reset and /exit are commands. Every
message gets exactly one output line: the reply with backslash, newline and carriage return
written as \\\\, \\n and \\r, so a reply never spans lines (an empty line if the message could
not be answered; the reason goes to stderr). Pipe mode reads and writes UTF-8.

When the conversation no longer leaves room for a reply of min(-n, context/2) tokens, the oldest
turns are dropped (the system prompt stays) until the prompt fills half of the rest of the
context, so that the next turns re-use the KV cache (runtime/history.py). The KV
cache is kept across turns: each new prompt re-uses the cached tokens it starts with and only
the rest is prefilled (--stats shows how many).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

from llmpack.formats.errors import LlmpackError

from .cmd_generate import add_backend_args, add_sampling_args, check_sampling, load_model, sampling_kwargs
from .history import fit_conversation, reply_reserve
from .prefix_cache import cache_consistent, common_prefix
from .tokenizer import StreamDecoder

EXAMPLE = """examples:
  llmpack chat qwen05.llmpack
  llmpack chat qwen05.llmpack --system "You are a terse assistant." --temperature 0.7 --top-p 0.9 --seed 1
  printf 'What is the capital of France?\\nAnd of Italy?\\n' | llmpack chat qwen05.llmpack -n 64
      (prints two lines, one reply per input line)
"""

COMMANDS_HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


class ChatSession:
    """A conversation with one model: history, template rendering, context fitting and KV-cache reuse."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int = 512, sampling: dict | None = None):
        self.model = model
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(sampling or {})
        self.messages: list[dict] = []
        self.cache = model.backend.new_cache()
        self.cached: list[int] = []  # the token ids whose keys/values are in self.cache
        self.last: dict = {}  # statistics of the last turn
        self.reset()

    def reset(self):
        """Forget the conversation (the KV cache stays: the next prompt re-uses what it shares)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> tuple[list[int], int]:
        """Render the history, dropping the oldest turns until it fits (they stay dropped); returns
        (ids, turns dropped)."""
        fitted = fit_conversation(self.model, self.messages, reply_reserve(self.model.context_length,
                                                                           self.max_new_tokens))
        self.messages = fitted.messages
        return fitted.ids, fitted.dropped_turns

    def send(self, text: str):
        """Add a user message and yield the reply as text pieces (the reply joins the history even
        if the caller stops early, e.g. on Ctrl-C: then as far as it was produced)."""
        t0 = time.perf_counter()
        self.last = {}
        message = {"role": "user", "content": text}
        self.messages.append(message)
        try:
            ids, dropped = self._prompt_ids()
        except BaseException:  # too long, a template error, Ctrl-C: the message is not part of the history
            if self.messages and self.messages[-1] is message:
                self.messages.pop()
            raise
        reuse = common_prefix(self.cached, ids)
        reuse = max(0, min(reuse, len(ids) - 1))  # at least one token must run to give the next-token logits
        self.cache.truncate(reuse)
        self.last = {"prompt_tokens": len(ids), "reused": reuse, "prefilled": len(ids) - reuse,
                     "dropped_turns": dropped, "generated": 0, "interrupted": False}
        generated: list[int] = []
        dec = StreamDecoder(self.model.tokenizer)
        shown: list[str] = []
        finished = False
        t_first = None
        try:
            for tok in self.model.generate_ids(ids, self.max_new_tokens, cache=self.cache, **self.sampling):
                if t_first is None:
                    t_first = time.perf_counter()
                generated.append(tok)
                piece = dec.push(tok)
                if piece:
                    shown.append(piece)
                    yield piece
            tail = dec.flush()
            if tail:
                yield tail
            finished = True
        finally:
            if not cache_consistent(self.cache):  # interrupted while the cache was growing
                self.cache, self.cached = self.model.backend.new_cache(), []
            else:
                self.cached = (ids + generated)[:self.cache.length]
            # a stopped reply is kept as far as it was shown (not a held-back half character)
            reply = self.model.tokenizer.decode(generated) if finished else "".join(shown)
            self.messages.append({"role": "assistant", "content": reply})
            now = time.perf_counter()
            self.last.update(generated=len(generated), interrupted=not finished, seconds=now - t0,
                             prefill_seconds=(t_first or now) - t0)

    def stats_line(self) -> str:
        s = self.last
        decode_s = s["seconds"] - s["prefill_seconds"]
        rate = (s["generated"] - 1) / decode_s if s["generated"] > 1 and decode_s > 0 else 0.0
        return (f"[prompt {s['prompt_tokens']} tokens: {s['reused']} reused from the cache, {s['prefilled']} "
                f"prefilled in {s['prefill_seconds']:.2f}s; {s['generated']} generated, {rate:.1f} tok/s"
                + (f"; dropped {s['dropped_turns']} oldest turn(s)" if s["dropped_turns"] else "") + "]")


def escape_line(text: str) -> str:
    """One reply on one line: backslash, newline and carriage return escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def unescape_line(line: str) -> str:
    """Inverse of escape_line (for scripts reading pipe-mode output)."""
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(line[i + 1], "\\" + line[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _parser():
    p = argparse.ArgumentParser(prog="llmpack chat", description=__doc__.split("—")[1].split("\n")[0].strip(),
                                epilog=__doc__.split("\n", 2)[2] + "\n" + EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".llmpack file")
    p.add_argument("--system", default=None, help="system prompt (kept when old turns are dropped)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    p.add_argument("--stats", action="store_true",
                   help="after each reply print token counts (reused / prefilled / generated) and speed to stderr")
    add_sampling_args(p)
    add_backend_args(p)
    return p


def main(argv) -> int:
    args = _parser().parse_args(argv)
    check_sampling(args)
    if args.max_new_tokens < 1:
        raise LlmpackError("-n must be at least 1")
    model = load_model(args)
    if not model.chat_template:
        print("llmpack chat: note: the model has no chat template; using plain 'role: content' lines",
              file=sys.stderr)
    session = ChatSession(model, args.system, args.max_new_tokens, sampling_kwargs(args))
    if sys.stdin.isatty():
        return _interactive(session, args)
    return _piped(session, args)


def _piped(session: ChatSession, args) -> int:
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(encoding="utf-8", errors="replace")
    out = sys.stdout
    for raw in sys.stdin:
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        reply = session.send(line)
        try:
            for piece in reply:
                out.write(escape_line(piece))
                out.flush()
        except LlmpackError as e:
            print(f"llmpack chat: error: {e}", file=sys.stderr)
        out.write("\n")
        out.flush()
        _report(session, args)
    return 0


def _report(session, args):
    if args.stats and session.last.get("seconds") is not None:
        print(session.stats_line(), file=sys.stderr, flush=True)
    elif session.last.get("dropped_turns"):
        print(f"[context full: dropped the {session.last['dropped_turns']} oldest turn(s)]", file=sys.stderr,
              flush=True)


def _interactive(session: ChatSession, args) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    # Ctrl-C stops a reply even when chat was started with SIGINT ignored: a background job of a
    # non-interactive shell inherits SIG_IGN, Python then installs no handler, and Ctrl-C did
    # nothing (the reply ran to its end: the Ctrl-C test failed in fresh-clone CI runs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with _no_flush_on_interrupt(sys.stdin):
        return _conversation(session, args)


@contextlib.contextmanager
def _no_flush_on_interrupt(stream):
    """Set the terminal's NOFLSH while chatting (restored on exit).

    Without it, Ctrl-C makes the terminal driver send SIGINT *and then* discard the output not yet
    read by the terminal (Linux n_tty isig(): signal first, flush second). Under load the chat
    process can catch the signal and write "[reply stopped]" before that flush runs, and the
    marker is thrown away: the prompt came back without it (a flaky test). The flush would also
    drop reply text already written, which the history records as shown. With NOFLSH nothing
    written is discarded.
    """
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
        changed = list(saved)
        changed[3] |= termios.NOFLSH
        termios.tcsetattr(fd, termios.TCSANOW, changed)
    except (ImportError, OSError, ValueError, AttributeError):  # no termios, or not a terminal
        yield
        return
    try:
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except OSError:
            pass


def _conversation(session: ChatSession, args) -> int:
    out = sys.stdout
    name = session.model.header.get("config", {}).get("model_type", "model")
    print(f"llmpack chat: {name}, context {session.model.context_length} tokens. {COMMANDS_HELP}.",
          file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /exit quits)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(COMMANDS_HELP, file=sys.stderr)
            continue
        reply = session.send(line)
        try:
            for piece in reply:
                out.write(piece)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:
            reply.close()  # records the partial reply now, not whenever the generator is collected
            out.write("\n")
            print("[reply stopped]", file=sys.stderr)
        except LlmpackError as e:
            print(f"llmpack chat: error: {e}", file=sys.stderr)
        out.flush()
        _report(session, args)
