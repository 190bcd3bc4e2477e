"""The `llmpack` command: a thin dispatcher, one module per subcommand."""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

from llmpack.formats.errors import LlmpackError

# subcommand -> (module, one-line help). Modules import lazily: `generate` never loads torch.
COMMANDS = {
    "convert": ("llmpack.converter.cmd_convert", "transformers checkpoint folder -> .llmpack file"),
    "generate": ("llmpack.runtime.cmd_generate", "continue a prompt, streaming tokens"),
    "chat": ("llmpack.runtime.cmd_chat", "multi-turn chat with the model's own template"),
    "serve": ("llmpack.runtime.cmd_serve", "OpenAI-compatible HTTP server with a chat page"),
    "inspect": ("llmpack.runtime.cmd_inspect", "show a file's header, tensors and quality report"),
    "export-onnx": ("llmpack.runtime.cmd_export_onnx", "write model.onnx + genai_config.json for onnxruntime(-genai)"),
    "eval": ("llmpack.cmd_eval", "KL divergence, top-1 and perplexity of a file against a reference"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items())
    return f"usage: llmpack COMMAND [options]\n\ncommands:\n{rows}\n\nRun `llmpack COMMAND --help` for examples."


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        try:
            print(usage())
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if argv[0] == "--version":
        from llmpack import __version__

        print(f"llmpack {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"llmpack: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd][0])
    except ModuleNotFoundError as e:
        if cmd == "convert" and e.name in ("torch", "transformers", "safetensors"):
            print("llmpack convert needs the converter extras: pip install 'llmpack[convert]'", file=sys.stderr)
            return 2
        raise
    previous = None
    if cmd in ("convert", "export-onnx") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)  # a terminated conversion leaves nothing, as Ctrl-C
    try:
        return _run(cmd, module, argv[1:])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(cmd: str, module, args: list) -> int:
    try:
        status = module.main(args) or 0
        sys.stdout.flush()  # a closed pipe surfaces here, not as "Exception ignored" at exit
        return status
    except LlmpackError as e:
        print(f"llmpack {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"llmpack {cmd}: terminated (SIGTERM); no output file was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `llmpack inspect --tensors F | head -1`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the Python docs' advice)
        return 128 + 13  # the status a shell shows for a tool that SIGPIPE ended (141)
    except Exception as e:  # noqa: BLE001 — a bug or an input we do not check yet: still one line
        if os.environ.get("LLMPACK_DEBUG"):
            raise
        print(f"llmpack {cmd}: internal error: {e.__class__.__name__}: {_one_line(e)} "
              f"(if the input is valid, please report this; LLMPACK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the interrupt every writer already cleans up after (its temporary removed)."""


def _terminate(signum, frame):
    raise Terminated


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
