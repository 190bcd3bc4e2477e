"""llmpack convert SRC -o OUT.llmpack — transformers checkpoint folder -> one packed file."""
from __future__ import annotations

import argparse
import importlib.util

from llmpack.formats.errors import LlmpackError

EXAMPLE = """example:
  llmpack convert ./Qwen2.5-Coder-0.5B-Instruct -o qwen05.llmpack --dtype q8
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpack convert", description=__doc__.split("—")[1].strip(),
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="transformers checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="output .llmpack file (written atomically)")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8"],
                   help="storage of the weight matrices (norms and biases stay f32); default f16")
    p.add_argument("--group-size", type=int, default=32, help="q8 group size along the input dim (default 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    for mod in ("torch", "transformers", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            raise LlmpackError(f"convert needs {mod}: pip install 'llmpack[convert]'")
    from .convert import convert

    convert(args.src, args.output, dtype=args.dtype, group_size=args.group_size, quiet=args.quiet)
    return 0
