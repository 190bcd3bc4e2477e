#!/usr/bin/env bash
# The README's test command: install llmpack with the converter and test extras, run every test
# (the real-model ones, marked `slow`, included: deselect them with `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[convert,dev]'
python -m pytest -q -ra "$@"
