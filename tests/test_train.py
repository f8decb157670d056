"""`dspark-chat train`: a short run on a tiny target makes a drafter the engine loads and decodes with,
losslessly, and with more accepted drafts than its random start; resuming, omitting the embeddings,
the training forward against inference, and calibration on rounds whose truth is known."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dspark_chat.engine import calibrate
from dspark_chat.engine.cli import main as cli
from dspark_chat.engine.decode import decode
from dspark_chat.engine.loading import load_drafter, load_target
from dspark_chat.engine.train import DECAY, Sequence, block_hidden, draft_outputs, dspark_loss, make_batch

from .conftest import TRAINING_TEXT, make_tiny_pair

LINES = [line for line in TRAINING_TEXT.split("\n") if line.strip()]


def learnable_target(folder: Path, tokenizer) -> Path:
    """A tiny target that has memorised TRAINING_TEXT: its greedy answers continue that text, which a
    drafter can learn (a random target's greedy text is close to noise)."""
    from transformers import Qwen3ForCausalLM

    target_dir, _ = make_tiny_pair(folder, tokenizer, std=0.1)
    model = Qwen3ForCausalLM.from_pretrained(target_dir)
    ids = torch.tensor(tokenizer(TRAINING_TEXT)["input_ids"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 64, (8,), generator=g)
        batch = torch.stack([ids[s : s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(target_dir)
    return target_dir


def snippets(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choice(LINES).split()
        start = rng.randrange(len(words))
        out.append(" ".join(words[start : start + rng.randint(2, 6)]))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("train")
    target_dir = learnable_target(root, tokenizer)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [s]}) + "\n" for s in snippets(0, 100)))

    def train(out: str, steps: int, *extra: str) -> Path:
        """A run into root/out; in DeepSpec's layout, whose config.json these tests read, unless --format is given."""
        layout = [] if "--format" in extra else ["--format", "deepspec"]
        args = ["train", "--target", str(target_dir), "--prompts", str(prompts), "--out", str(root / out), *layout,
                "--steps", str(steps), "--layers", "1", "--block-size", "4", "--markov-rank", "8", "--target-layers", "0,1",
                "--max-new-tokens", "40", "--gen-batch", "50", "--batch", "8", "--anchors", "16", "--lr", "3e-3",
                "--eval-every", "50", "--save-every", "50", "--cache-dir", str(root / "cache"), "--device", "cpu", *extra]
        assert cli(args) == 0
        return root / out

    train.target_dir = target_dir
    return train


@pytest.fixture(scope="module")
def target(run):
    return load_target(str(run.target_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def trained(run):
    return run("start", 0), run("trained", 120)


def answer(target, drafter, prompt_ids):
    target.rewind(0)
    if drafter is not None:
        drafter.rewind(0)
    steps = list(decode(target, drafter, prompt_ids, max_new_tokens=40))
    tokens = [t for s in steps for t in s.token_ids]
    rounds = len(steps) - 1  # the prefill commits the first token without a round
    return tokens, (len(tokens) - 1) / max(rounds, 1)


def chat_ids(target, text):
    return list(target.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])


def test_training_raises_acceptance_on_new_prompts_and_decodes_losslessly(trained, target):
    start_dir, trained_dir = trained
    report = json.loads((trained_dir / "training.json").read_text())
    assert report["step"] == 120 and report["tau_after"] > report["tau_before"] + 0.5
    start, better = load_drafter(str(start_dir), target), load_drafter(str(trained_dir), target)
    taus = {"start": [], "trained": []}
    for text in snippets(1, 8):  # prompts training never saw
        ids = chat_ids(target, text)
        baseline, tau = answer(target, None, ids)
        assert tau == 1.0
        for name, drafter in (("start", start), ("trained", better)):
            tokens, tau = answer(target, drafter, ids)
            assert tokens == baseline
            taus[name].append(tau)
    mean = {k: sum(v) / len(v) for k, v in taus.items()}
    assert mean["trained"] > mean["start"] + 0.5, mean


def test_training_forward_is_the_inference_backbone(trained, target):
    """block_hidden runs many blocks in one pass with a mask; propose runs one with cached context.
    Both must give the same hidden states for the same anchor (in float: training never runs int8)."""
    drafter = load_drafter(str(trained[1]), target, int8=False)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(30, drafter.fc.in_features, generator=g)
    ids = torch.randint(4, 512, (30,), generator=g)
    anchors = torch.tensor([[0, 5, 17, 29]])
    block_ids = torch.full((1, 4, drafter.block_size), drafter.mask_token_id)
    block_ids[0, :, 0] = ids[anchors[0]]
    with torch.no_grad():
        batched = block_hidden(drafter, features[None], block_ids, anchors)[0]
    for i, a in enumerate(anchors[0].tolist()):
        drafter.rewind(0)
        if a:
            drafter.observe(features[:a])
        with torch.no_grad():
            single = drafter.backbone(ids[a])
        torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-5)


def test_the_loss_over_a_draft_vocabulary_is_the_whole_loss_with_the_draft_zero_outside_it(trained, target):
    drafter = load_drafter(str(trained[1]), target, int8=False)
    g = torch.Generator().manual_seed(5)
    d, V = drafter.fc.weight.shape[0], target.vocab_size
    sequences = [Sequence(torch.randint(4, V, (40,), generator=g), 8, torch.randn(39, drafter.fc.in_features, generator=g),
                          torch.randn(39, d, generator=g), False) for _ in range(3)]
    batch = make_batch(sequences, [[8, 20, 37], [10, 11, 30], [9, 25, 38]], drafter.block_size, drafter.mask_token_id,
                       "cpu", drafter.lm_head)
    vocab = torch.cat([torch.tensor(sorted(set(batch.labels.flatten().tolist())))[::2], torch.arange(4, V, 5)]).unique()
    with torch.no_grad():
        logits, _ = draft_outputs(drafter, batch)  # the whole vocabulary
        outside = torch.ones(V, dtype=torch.bool)
        outside[vocab] = False
        logq = torch.log_softmax(logits.masked_fill(outside, float("-inf")), -1)
        p = torch.softmax(drafter.lm_head(batch.last.float()), -1)
        weights = batch.valid.cumprod(-1) * torch.exp(-torch.arange(drafter.block_size) / DECAY)
        l1 = ((logq.exp() - p).abs().sum(-1) * weights).sum() / weights.sum()
        known = ~outside[batch.labels]
        ce = (-logq.gather(-1, batch.labels[..., None]).squeeze(-1).nan_to_num(0, 0, 0) * known * weights).sum() / weights.sum()
        drafter.use_draft_vocab(vocab)
        _, terms = dspark_loss(drafter, batch)
    assert 0 < known.float().mean() < 1
    assert terms["l1"] == pytest.approx(float(l1), rel=1e-4) and terms["ce"] == pytest.approx(float(ce), rel=1e-4)


def draft_ids(folder: Path) -> list[int]:
    """The target ids of a speculators-format drafter's draft vocabulary (d2t: draft id j is target id j + d2t[j])."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        d2t = f.get_tensor("d2t")
    return (d2t + torch.arange(len(d2t))).tolist()


def test_a_drafter_trained_over_a_draft_vocabulary_drafts_from_it_and_decodes_losslessly(run, target, capsys):
    """In the default layout, the speculators format: the draft vocabulary travels as draft_vocab_size and d2t."""
    out = run("draft-vocab", 60, "--draft-vocab", "64", "--format", "speculators")
    config = json.loads((out / "config.json").read_text())
    ids = draft_ids(out)
    report = json.loads((out / "training.json").read_text())
    assert config["architectures"] == ["DSparkSpeculator"] and config["draft_vocab_size"] == 64
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(run.target_dir)
    assert not (out / "draft_vocab.json").exists()
    assert len(ids) == 64 and ids == sorted(set(ids)) and set(target.stop_ids) <= set(ids)
    assert report["draft_vocab"] == 64 and 0.5 < report["draft_vocab_coverage"]["train"] < 1
    assert report["tau_after"] > report["tau_before"] + 0.3
    drafter = load_drafter(str(out), target)
    assert drafter.layout == "speculators" and drafter.draft_vocab.tolist() == ids
    for text in snippets(2, 3):
        prompt = chat_ids(target, text)
        assert answer(target, drafter, prompt)[0] == answer(target, None, prompt)[0]
    capsys.readouterr()
    # The vocabulary selects rows of full-vocabulary weights: a resumed run may choose another one.
    run("draft-vocab", 62, "--draft-vocab", "32", "--eval-every", "1", "--format", "speculators")
    err = capsys.readouterr().err
    assert "resuming at step 60" in err and "the draft vocabulary changed with the data: 0 tokens in, 32 out" in err
    resumed = draft_ids(out)
    assert len(resumed) == 32 and set(resumed) <= set(ids)
    assert load_drafter(str(out), target).draft_vocab.tolist() == resumed
    # Training goes on from it, the vocabulary kept; no step leaves its weights as they were.
    kept = run("draft-vocab-kept", 0, "--init", str(out), "--format", "speculators")
    assert draft_ids(kept) == resumed
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(kept / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_second_prompt_group_is_answered_and_cached_on_its_own(run, capsys):
    root = run.target_dir.parent
    more = root / "more-prompts.jsonl"
    more.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in snippets(3, 40)))
    run("one-group", 0)
    shards = lambda: {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("shard-*.safetensors")}
    before = shards()
    capsys.readouterr()
    run("two-groups", 0, "--prompts", str(more))
    err = capsys.readouterr().err
    after = shards()
    assert {p: after[p] for p in before} == before  # the first group's answers were reused, not made again
    added = {p.parent for p in set(after) - set(before)}
    assert len(added) == 1 and f"generating answers for 40 prompts (1 of 1 batches to do) into {added.pop()}" in err
    assert "data: 133 training and 7 held-out answers" in err  # 95 + 5 and 38 + 2: every 20th of each group held out


def test_resuming_continues_the_step_count(run, capsys):
    out = run("resumed", 3, "--save-every", "1", "--eval-every", "2")
    assert json.loads((out / "training.json").read_text())["step"] == 3
    capsys.readouterr()
    run("resumed", 5, "--save-every", "1", "--eval-every", "2")
    assert "resuming at step 3" in capsys.readouterr().err
    report = json.loads((out / "training.json").read_text())
    assert report["step"] == 5 and len(report["history"]["loss"]) == 5
    with pytest.raises(ValueError, match="another configuration"):
        from dspark_chat.engine.cli import build_parser
        from dspark_chat.engine.train import train

        args = build_parser().parse_args(["train", "--target", str(run.target_dir), "--prompts", "unused", "--out", str(out)])
        args.prompts = [[str(out.parent / "prompts.jsonl")]]
        args.cache_dir, args.max_new_tokens, args.gen_batch, args.target_layers = str(out.parent / "cache"), 40, 50, [0, 1]
        train(args, log=lambda _: None)  # block size 7 and 2 layers: not the run saved there


def test_training_goes_on_from_an_init_drafter_keeping_its_architecture_and_vocabulary(trained, run, target, capsys):
    start_dir, trained_dir = trained
    random_start = json.loads((start_dir / "training.json").read_text())["tau_before"]
    out = run("fine-tuned", 10, "--init", str(trained_dir), "--draft-vocab", "48", "--lr", "1e-3")
    report = json.loads((out / "training.json").read_text())
    assert report["init"] == str(trained_dir) and report["step"] == 10
    assert report["tau_before"] > random_start + 0.5  # the trained weights, not a random start
    assert report["tau_after"] > random_start + 0.5
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((trained_dir / "config.json").read_text())
    vocab = json.loads((out / "draft_vocab.json").read_text())["ids"]
    assert len(vocab) == 48
    drafter = load_drafter(str(out), target)
    for text in snippets(4, 3):
        prompt = chat_ids(target, text)
        assert answer(target, drafter, prompt)[0] == answer(target, None, prompt)[0]
    capsys.readouterr()
    # Without --draft-vocab the init drafter's vocabulary is kept; no step leaves its weights as they were.
    kept = run("kept", 0, "--init", str(out))
    assert "draft vocabulary: the 48 tokens of the --init drafter cover" in capsys.readouterr().err
    assert json.loads((kept / "draft_vocab.json").read_text())["ids"] == vocab
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(kept / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_an_init_that_is_not_a_drafter_or_contradicts_an_option_is_refused(trained, run, capsys):
    _, trained_dir = trained
    root = run.target_dir.parent
    base = ["train", "--target", str(run.target_dir), "--prompts", str(root / "prompts.jsonl"), "--steps", "1",
            "--max-new-tokens", "40", "--gen-batch", "50", "--cache-dir", str(root / "cache"), "--device", "cpu"]
    assert cli(base + ["--out", str(root / "refused"), "--init", str(trained_dir), "--block-size", "7"]) != 0
    assert f"--block-size 7: the --init drafter {trained_dir} has 4; leave --block-size out to keep it" in capsys.readouterr().err
    assert cli(base + ["--out", str(root / "refused"), "--init", str(run.target_dir)]) != 0
    assert "architecture Qwen3ForCausalLM is not supported" in capsys.readouterr().err
    assert not (root / "refused").exists()


def test_a_narrower_mlp_is_written_loaded_and_kept_by_an_init_run(run, target, capsys):
    out = run("narrow", 2, "--intermediate-size", "24")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 24  # the target's is 64
    drafter = load_drafter(str(out), target)
    assert [layer.mlp.up_proj.out_features for layer in drafter.layers] == [24]
    ids = chat_ids(target, "The quick brown")
    assert answer(target, drafter, ids)[0] == answer(target, None, ids)[0]
    kept = run("narrow-kept", 0, "--init", str(out))
    assert json.loads((kept / "config.json").read_text())["intermediate_size"] == 24


def drafts(target, drafter, texts):
    """Every round's drafts and confidence logits over a few prompts, one list per prompt."""
    rounds = []
    for text in texts:
        target.rewind(0)
        drafter.rewind(0)
        steps = list(decode(target, drafter, chat_ids(target, text), max_new_tokens=40))[1:]
        rounds.append([(s.draft_ids, s.confidences) for s in steps])
    return rounds


def test_an_init_drafter_grown_by_a_layer_and_neurons_drafts_as_before_then_trains(trained, run, target, capsys):
    _, trained_dir = trained  # 1 layer, the target's MLP width (64)
    grown = run("grown", 0, "--init", str(trained_dir), "--layers", "2", "--intermediate-size", "80")
    config = json.loads((grown / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"], config["layer_types"]) == (2, 80, ["full_attention"] * 2)
    before, after = load_drafter(str(trained_dir), target, int8=False), load_drafter(str(grown), target, int8=False)
    assert [layer.mlp.up_proj.out_features for layer in after.layers] == [80, 80]
    # The added layer and neurons start as no-ops: the same drafts, the same confidences.
    texts = snippets(5, 3)
    for old, new in zip(drafts(target, before, texts), drafts(target, after, texts)):
        assert [ids for ids, _ in old] == [ids for ids, _ in new]
        for (_, a), (_, b) in zip(old, new):  # None where a round drafted nothing
            assert a is b is None or torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    # Training moves them; the result loads and decodes losslessly.
    trained_on = run("grown-trained", 10, "--init", str(grown), "--layers", "2", "--lr", "1e-3")
    with safe_open(trained_on / "model.safetensors", "pt") as f:
        assert f.get_tensor("layers.1.mlp.down_proj.weight").abs().sum() > 0
    drafter = load_drafter(str(trained_on), target)
    for text in snippets(6, 2):
        prompt = chat_ids(target, text)
        assert answer(target, drafter, prompt)[0] == answer(target, None, prompt)[0]
    capsys.readouterr()
    root = run.target_dir.parent
    refused = ["train", "--target", str(run.target_dir), "--prompts", str(root / "prompts.jsonl"), "--out",
               str(root / "refused-layers"), "--init", str(grown), "--layers", "1", "--cache-dir", str(root / "cache")]
    assert cli(refused) != 0
    assert (f"--layers 1: the --init drafter {grown} has 2; layers can be added to a drafter, not taken away"
            in capsys.readouterr().err)


def test_an_init_drafter_narrowed_keeps_its_strongest_neurons(trained, run, target):
    _, trained_dir = trained
    narrowed = run("narrowed", 0, "--init", str(trained_dir), "--intermediate-size", "24")
    assert json.loads((narrowed / "config.json").read_text())["intermediate_size"] == 24
    with safe_open(trained_dir / "model.safetensors", "pt") as a, safe_open(narrowed / "model.safetensors", "pt") as b:
        gate, up, down = (a.get_tensor(f"layers.0.mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        strength = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
        keep = sorted(strength.argsort(descending=True)[:24].tolist())
        assert torch.equal(b.get_tensor("layers.0.mlp.up_proj.weight"), up[keep])
        assert torch.equal(b.get_tensor("layers.0.mlp.down_proj.weight"), down[:, keep])
    drafter = load_drafter(str(narrowed), target)
    prompt = chat_ids(target, "The quick brown")
    assert answer(target, drafter, prompt)[0] == answer(target, None, prompt)[0]


@pytest.mark.parametrize("omit", [True, False])
def test_embeddings_are_omitted_on_request_and_the_target_s_are_shared(run, target, omit):
    out = run(f"omit-{omit}", 2, *(["--omit-embeddings"] if omit else []))
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert ("embed_tokens.weight" in names) is not omit and ("lm_head.weight" in names) is not omit
    drafter = load_drafter(str(out), target)
    assert drafter.embed_tokens is target.model.get_input_embeddings()
    assert drafter.lm_head is target.model.get_output_embeddings()
    ids = chat_ids(target, "The quick brown")
    assert answer(target, drafter, ids)[0] == answer(target, None, ids)[0]
    assert json.loads((out / "calibration.json").read_text())["temperatures"]


def test_sequential_temperature_scaling_recovers_known_temperatures():
    g = torch.Generator().manual_seed(0)
    truth = [2.0, 3.0, 0.7, 4.0]  # mostly overconfident heads, as an uncalibrated confidence head tends to be
    logits = torch.randn(20000, 4, generator=g) * 3 + 1
    accepted = torch.rand(20000, 4, generator=g) < torch.sigmoid(logits / torch.tensor(truth))
    fitted = calibrate.fit_temperatures(logits, accepted)
    for got, want in zip(fitted, truth):
        assert abs(got / want - 1) < 0.15, (fitted, truth)
    observed = accepted.float().cumprod(-1)
    before = calibrate.ece(calibrate.survival(logits), observed)
    after = calibrate.ece(calibrate.survival(logits, fitted), observed)
    assert before > 0.03 and after < 0.01 and after < before / 4


def test_ece_is_zero_for_calibrated_bins_and_large_for_confident_mistakes():
    predicted = torch.tensor([0.25] * 4 + [0.95] * 4)
    assert calibrate.ece(predicted, torch.tensor([1, 0, 0, 0, 1, 1, 1, 1.0])) == pytest.approx(0.025)
    assert calibrate.ece(torch.full((10,), 0.9), torch.zeros(10)) == pytest.approx(0.9)


@pytest.mark.slow
def test_the_embedded_model_gets_the_shipped_drafter_and_decodes_losslessly_with_it(smollm2, monkeypatch):
    import dspark_chat.engine.engine as engine_module
    from dspark_chat.engine.catalog import SHIPPED_DRAFTERS
    from dspark_chat.engine.dspark import DSparkDrafter
    from dspark_chat.engine.engine import Engine
    from dspark_chat.engine.prompt_lookup import LookupOrDraft

    folder = SHIPPED_DRAFTERS["smollm2"]
    assert (folder / "model.safetensors").stat().st_size <= 25_000_000
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert not {"embed_tokens.weight", "lm_head.weight"} & set(f.keys())
    loaded = []  # the session's SmolLM2 stands in for loading it again: what Engine.load adds to it is the drafter
    monkeypatch.setattr(engine_module, "load_target", lambda spec, *args, **kwargs: loaded.append(spec) or smollm2)
    engine = Engine.load("smollm2", dtype="float32", device="cpu", scheduler="off")
    assert isinstance(engine.drafter, LookupOrDraft) and engine.scheduler.temperatures  # with prompt lookup
    assert isinstance(engine.drafter.drafter, DSparkDrafter)
    assert engine.drafter.drafter.embed_tokens is engine.target.model.get_input_embeddings()
    assert Engine.load("smollm2", dtype="float32", device="cpu", default_drafter=False).drafter is None
    assert loaded == ["smollm2", "smollm2"]
    ids = engine.chat_ids([{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold "
                                                          "half as many clips in May. How many clips did she sell altogether?"}])
    spec = [s.to_dict() for s in engine.generate(ids, max_new_tokens=48)]
    plain = [s.to_dict() for s in engine.generate(ids, max_new_tokens=48, speculative=False)]
    assert [t for s in spec for t in s["token_ids"]] == [t for s in plain for t in s["token_ids"]]
    assert sum(s["accepted"] for s in spec) > 0


@pytest.mark.slow
def test_the_shipped_drafter_drafts_in_int8_as_in_float(smollm2):
    """On a CPU the drafter's own weights run in int8 (DSparkDrafter.quantize). Its blocks after every
    position of a real answer must stay the float drafter's, almost always; the target's shared
    embeddings and LM head stay float."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    from dspark_chat.engine.catalog import SHIPPED_DRAFTERS
    from dspark_chat.engine.sampling import Sampling

    folder = str(SHIPPED_DRAFTERS["smollm2"])
    int8, float32 = load_drafter(folder, smollm2), load_drafter(folder, smollm2, int8=False)
    for module in (int8.layers[0].mlp.down_proj, int8.layers[-1].self_attn.q_proj, int8.draft_head):
        assert isinstance(module, Int8Linear)
    assert type(float32.draft_head) is torch.nn.Linear and type(float32.fc) is torch.nn.Linear
    assert int8.lm_head is smollm2.model.get_output_embeddings() and type(int8.lm_head) is torch.nn.Linear
    answer = ("def running_max(numbers):\n    result = []\n    best = None\n    for n in numbers:\n"
              "        if best is None or n > best:\n            best = n\n        result.append(best)\n    return result\n")
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Write running_max(numbers) in Python."},
                                                 {"role": "assistant", "content": answer}], tokenize=True, return_dict=True)["input_ids"]
    smollm2.rewind(0)
    _, features = smollm2.forward(ids, int8.feature_layers)
    smollm2.rewind(0)
    same_first = same_block = 0
    for p in range(start := len(ids) - 60, len(ids)):
        blocks = []
        for drafter in (int8, float32):
            drafter.rewind(0)
            drafter.observe(features[:p])
            blocks.append(drafter.propose(torch.tensor(ids[: p + 1]), 7, Sampling()).tokens.tolist())
        same_first += blocks[0][0] == blocks[1][0]
        same_block += blocks[0] == blocks[1]
    positions = len(ids) - start
    assert same_first >= 0.9 * positions and same_block >= 0.6 * positions, (same_first, same_block, positions)
