"""llmpack generate FILE -p PROMPT — continue a prompt, streaming tokens to stdout."""
from __future__ import annotations

import argparse
import sys

from .model import load

EXAMPLE = """examples:
  llmpack generate qwen05.llmpack -p "def fibonacci(n):" -n 64
  llmpack generate qwen05.llmpack -p "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
"""


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (default: the model's generation_config; greedy if none)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize seen tokens (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification at load")


def add_backend_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("engine")
    g.add_argument("--backend", choices=["onnxruntime", "numpy"], default=None,
                   help="onnxruntime (fast; the default when installed) or numpy (the reference)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="compute threads (default: the number of physical cores)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="use at most N tokens of the model's context (default: all of it)")


def load_model(args):
    """The model named by args.file with the engine options of add_backend_args."""
    from llmpack.formats.errors import LlmpackError

    if args.threads is not None and args.threads < 1:
        raise LlmpackError("--threads must be at least 1")
    if args.context is not None and args.context < 2:
        raise LlmpackError("--context must be at least 2 tokens")
    return load(args.file, verify=not args.no_verify, backend=args.backend, threads=args.threads,
                context=args.context)


def sampling_kwargs(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "repeat_penalty": args.repeat_penalty, "seed": args.seed}


def check_sampling(args):
    from llmpack.formats.errors import LlmpackError

    if args.temperature is not None and args.temperature < 0:
        raise LlmpackError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise LlmpackError("--top-p must be in (0, 1]")
    if args.top_k < 0 or args.repeat_penalty <= 0:
        raise LlmpackError("--top-k must be >= 0 and --repeat-penalty > 0")


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="llmpack generate", description=__doc__.split("—")[1].strip(),
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".llmpack file")
    p.add_argument("-p", "--prompt", required=True, help="text to continue")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128,
                   help="most new tokens to generate (default 128; fewer if the model ends its text)")
    add_sampling_args(p)
    add_backend_args(p)
    args = p.parse_args(argv)
    check_sampling(args)
    model = load_model(args)
    out = sys.stdout
    out.write(args.prompt)
    for piece in model.generate(args.prompt, args.max_new_tokens, **sampling_kwargs(args)):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0
