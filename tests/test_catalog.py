"""The catalog: the shipped models.toml, its validation errors (file, line, field, what is wrong), the
user's own file, and the packaging that lets an installed wheel find models.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dspark_chat.engine.catalog import BUILTIN, SHIPPED_DRAFTERS, CatalogError, load_catalog, user_catalog_path

from .conftest import TINY_TARGET_TOML

REPO = Path(__file__).resolve().parent.parent
DEEPSPEC = {
    "qwen3-4b": "Qwen/Qwen3-4B", "qwen3-8b": "Qwen/Qwen3-8B", "qwen3-14b": "Qwen/Qwen3-14B",
    "gemma4-12b": "google/gemma-4-12B-it",
}


def test_builtin_catalog_has_every_released_deepspec_drafter():
    assert BUILTIN == REPO / "models.toml"
    catalog = load_catalog([BUILTIN])
    assert catalog.default == "smollm2"
    for short, target in DEEPSPEC.items():
        for kind in ("dspark", "dflash"):
            pair = catalog.pair(f"{short}-{kind}")
            assert pair.kind == kind and pair.block_size == 7 and pair.drafter_layers == 5
            assert pair.target.repo == target
            assert pair.drafter == f"deepseek-ai/{kind}_{short.replace('-', '_')}_block7"
            assert pair.repos() == [(target, "main"), (pair.drafter, "main")]
            assert pair.license and pair.drafter_dtype == "bfloat16"
    embedded = catalog.pair("smollm2")
    assert embedded.kind == "dspark+lookup" and embedded.target.embedded and embedded.repos() == []
    assert embedded.specs() == ("smollm2", str(SHIPPED_DRAFTERS["smollm2"]), True)


def test_qwen3_numbers_are_their_configs():
    """The architecture numbers, checked against a model built from them on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    intermediate = {"qwen3-4b": 9728, "qwen3-8b": 12288, "qwen3-14b": 17408}
    targets = load_catalog([BUILTIN]).targets
    for name, size in intermediate.items():
        t = targets[name]
        assert (t.vocab_size, t.max_positions, t.kv_heads, t.head_dim) == (151_936, 40_960, 8, 128)
        config = Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=size,
                             num_hidden_layers=t.layers, num_attention_heads=t.attention_heads,
                             num_key_value_heads=t.kv_heads, head_dim=t.head_dim, tie_word_embeddings=t.tied_embeddings)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == t.params
        assert t.estimated == ("download_bytes",) and t.params * 2 < t.download_bytes < t.params * 2 * 1.01


def test_drafter_sizes_match_the_deepspec_architecture():
    """Parameter counts of the Qwen3 drafters: DeepSpec's 5-layer config on the target, built on the meta device
    with this project's drafter (same module names and shapes as the checkpoints)."""
    import torch
    from transformers import Qwen3Config

    from dspark_chat.engine.dspark import DSparkDrafter

    intermediate = {"qwen3-4b": 9728, "qwen3-8b": 12288, "qwen3-14b": 17408}
    catalog = load_catalog([BUILTIN])
    for name, size in intermediate.items():
        for kind in ("dspark", "dflash"):
            pair, t = catalog.pair(f"{name}-{kind}"), catalog.targets[name]
            config = Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=size,
                                 num_hidden_layers=pair.drafter_layers, num_attention_heads=t.attention_heads,
                                 num_key_value_heads=t.kv_heads, head_dim=t.head_dim)
            config.block_size, config.mask_token_id, config.target_layer_ids = 7, 151669, [1, 9, 17, 25, 33]
            config.markov_rank, config.markov_head_type = (256, "vanilla") if kind == "dspark" else (0, None)
            config.enable_confidence_head = config.confidence_head_with_markov = kind == "dspark"
            with torch.device("meta"):
                drafter = DSparkDrafter(config)
            assert sum(p.numel() for p in drafter.parameters()) == pair.drafter_params, pair.name


# Hybrid targets: the config fields the catalog leaves out (linear-attention heads, experts, the layer layout), as
# their model cards give them.
HYBRID_CONFIGS = {
    "qwen36-27b": dict(intermediate_size=17_408, linear_num_key_heads=16, linear_num_value_heads=48,
                       linear_key_head_dim=128, linear_value_head_dim=128,
                       layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 16),
    "qwen36-35b-a3b": dict(linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                           linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512,
                           layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 10),
    "lfm25-1-2b": dict(intermediate_size=12_288, block_auto_adjust_ff_dim=True, conv_L_cache=3,
                       layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)]),
}


def test_hybrid_numbers_are_their_configs():
    """Parameters, attention layers and the state one sequence keeps, from a model built on the meta device and
    run there over two tokens (transformers allocates the recurrent and convolution states as it goes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    targets = load_catalog([BUILTIN]).targets
    for name, extra in HYBRID_CONFIGS.items():
        t = targets[name]
        heads = {} if t.model_type == "lfm2" else dict(head_dim=t.head_dim)
        config = AutoConfig.for_model(
            t.model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.layers,
            num_attention_heads=t.attention_heads, num_key_value_heads=t.kv_heads, tie_word_embeddings=t.tied_embeddings,
            max_position_embeddings=t.max_positions, **heads, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == t.params, name
        assert config.layer_types.count("full_attention") == t.attention_layers
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6]], device="meta"), cache=cache, use_cache=True)
        states = [s for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)
                  for s in [*layer.conv_states.values(), *layer.recurrent_states.values()] if s is not None]
        assert sum(s.numel() * s.element_size() for s in states) == t.state_bytes, name


def test_a_pair_that_speculates_on_a_hybrid_whose_state_cannot_be_rolled_back_is_refused(tmp_path):
    jamba = TARGET.replace("[targets.tiny]", "[targets.jamba]") + 'model_type = "jamba"\nstate_bytes = 4096\n'
    lines = errors(tmp_path, jamba + TINY_PAIR.replace('target = "tiny"', 'target = "jamba"'))
    assert len(lines) == 1 and "[pairs.tiny-lookup] kind: target jamba (jamba) keeps a recurrent" in lines[0]
    assert 'use kind = "none"' in lines[0]
    plain = jamba + TINY_PAIR.replace('target = "tiny"', 'target = "jamba"').replace('"prompt-lookup"', '"none"')
    assert load_catalog([BUILTIN, write(tmp_path / "plain.toml", plain)]).pair("tiny-lookup").target.state_bytes == 4096
    lines = errors(tmp_path, TARGET.replace("[targets.tiny]", "[targets.odd]") + "state_bytes = 4096\n")
    assert len(lines) == 1 and "[targets.odd] state_bytes: a target with recurrent or convolution state names its model_type" in lines[0]
    lines = errors(tmp_path, TARGET.replace("[targets.tiny]", "[targets.odd]") + "attention_layers = 99\n")
    assert len(lines) == 1 and "[targets.odd] attention_layers: more than its" in lines[0]


def test_eagle3_pairs_have_deepspec_eagle3_drafters_of_their_architecture():
    """DeepSpec's config/eagle3/*.py: one layer reading 5 target layers, a chain of 7 drafts; the parameter
    counts of that drafter built on the meta device by this project's Eagle3 drafter (same names and shapes)."""
    import torch

    from dspark_chat.engine.eagle3 import Eagle3Drafter, layout_from

    intermediate = {"qwen3-4b": 9728, "qwen3-8b": 12288, "qwen3-14b": 17408}
    catalog = load_catalog([BUILTIN])
    for short, target in DEEPSPEC.items():
        pair = catalog.pair(f"{short}-eagle3")
        assert pair.kind == "eagle3" and pair.block_size == 7 and pair.drafter_layers == 1
        assert pair.drafter == f"deepseek-ai/eagle3_{short.replace('-', '_')}_ttt7" and pair.target.repo == target
        assert pair.specs() == (target, pair.drafter, False)
        if short not in intermediate:
            assert "drafter_params" in pair.estimated  # Gemma 4 12B's attention geometry is not published
            continue
        t = pair.target
        raw = {"architectures": ["Qwen3Eagle3Model"], "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
               "intermediate_size": intermediate[short], "num_hidden_layers": 1, "layer_types": ["full_attention"],
               "num_attention_heads": t.attention_heads, "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim,
               "target_layer_ids": [1, 9, 17, 25, 33], "ttt_length": 7}
        with torch.device("meta"):
            drafter = Eagle3Drafter(layout_from(raw, t.layers))
        assert sum(p.numel() for p in drafter.parameters()) == pair.drafter_params, pair.name
        assert pair.drafter_params * 2 < pair.drafter_download_bytes < pair.drafter_params * 2 * 1.01


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


TARGET = TINY_TARGET_TOML
TINY_PAIR = """
[pairs.tiny-lookup]
target = "tiny"
kind = "prompt-lookup"
block_size = 10
license = "MIT"
"""


def errors(tmp_path, text: str) -> list[str]:
    path = write(tmp_path / "models.toml", text)
    with pytest.raises(CatalogError) as raised:
        load_catalog([BUILTIN, path])
    return str(raised.value).splitlines()


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_validation_errors_name_file_line_field_and_problem(tmp_path):
    text = TARGET + """
[pairs.broken]
target = "tiny"
kind = "dspark"
block_size = 0
drafter = "not a hub id"
drafter_layers = 5
drafter_parms = 10
drafter_dtype = "bfloat16"
drafter_download_bytes = 1
license = "MIT"
"""
    path = tmp_path / "models.toml"
    lines = errors(tmp_path, text)
    assert f"{path}:{line_of(text, 'block_size = 0')}: [pairs.broken] block_size: expected a positive integer, got 0" in lines
    assert f"{path}:{line_of(text, 'drafter_parms')}: [pairs.broken] drafter_parms: unknown field (did you mean 'drafter_params'?)" in lines
    assert f"{path}:{line_of(text, '[pairs.broken]')}: [pairs.broken] drafter_params: missing" in lines
    assert (f"{path}:{line_of(text, 'not a hub id')}: [pairs.broken] drafter: expected a Hub id like Qwen/Qwen3-4B "
            "(or 'smollm2'), got 'not a hub id'") in lines
    assert len(lines) == 4


def test_cross_reference_and_consistency_errors(tmp_path):
    text = TARGET.replace("kv_heads = 2", "kv_heads = 3") + """
[pairs.lookup]
target = "tiny"
kind = "prompt-lookup"
block_size = 10
drafter = "acme/drafter"
license = "MIT"

[pairs.orphan]
target = "qwen3-4bb"
kind = "none"
license = "MIT"
estimated = ["params"]
"""
    path = tmp_path / "models.toml"
    lines = errors(tmp_path, text)
    assert f"{path}:{line_of(text, 'drafter = ')}: [pairs.lookup] drafter: a prompt-lookup pair has no drafter checkpoint" in lines
    assert f"{path}:{line_of(text, 'estimated')}: [pairs.orphan] estimated: names 'params', which is not a field of this entry" in lines
    # checked once the fields are good: the KV heads, then the target reference
    fixed = text.replace('estimated = ["params"]\n', "").replace('drafter = "acme/drafter"\n', "")
    lines = errors(tmp_path, fixed)
    assert lines == [
        f"{path}:{line_of(fixed, 'kv_heads = 3')}: [targets.tiny] kv_heads: must divide attention_heads",
        f"{path}:{line_of(fixed, 'qwen3-4bb')}: [pairs.orphan] target: no [targets.qwen3-4bb] in the catalog (did you mean 'qwen3-4b'?)",
    ]


def test_a_drafter_with_prompt_lookup_takes_the_shipped_drafter_or_the_one_named(tmp_path):
    text = TARGET + """
[pairs.embedded-both]
target = "smollm2"
kind = "dspark+lookup"
block_size = 10
license = "Apache-2.0"

[pairs.hub-both]
target = "qwen3-4b"
kind = "dspark+lookup"
block_size = 10
drafter = "deepseek-ai/dspark_qwen3_4b_block7"
drafter_layers = 5
drafter_params = 1_393_133_569
drafter_dtype = "bfloat16"
drafter_download_bytes = 2_786_280_000
license = "MIT"
"""
    catalog = load_catalog([BUILTIN, write(tmp_path / "models.toml", text)])
    embedded = catalog.pair("embedded-both")
    assert embedded.specs() == ("smollm2", str(SHIPPED_DRAFTERS["smollm2"]), True) and embedded.repos() == []
    hub = catalog.pair("hub-both")
    assert hub.specs() == ("Qwen/Qwen3-4B", "deepseek-ai/dspark_qwen3_4b_block7", True)
    assert hub.repos() == [("Qwen/Qwen3-4B", "main"), ("deepseek-ai/dspark_qwen3_4b_block7", "main")]
    # no drafter named and none shipped for the target: refused with what to do
    broken = text.replace('target = "smollm2"', 'target = "qwen3-8b"')
    path = tmp_path / "models.toml"
    kind_line = line_of(broken, 'kind = "dspark+lookup"')  # the first pair's
    assert errors(tmp_path, broken) == [
        f"{path}:{kind_line}: [pairs.embedded-both] kind: dspark+lookup without a drafter "
        "takes the drafter this project ships for the target, and there is none for qwen3-8b: add the drafter fields"]


def test_toml_syntax_and_top_level_errors(tmp_path):
    text = TARGET + "\n[pairs.x]\nkind = dspark\n"
    [line] = errors(tmp_path, text)
    assert line.startswith(f"{tmp_path / 'models.toml'}:{line_of(text, 'kind = dspark')}: not valid TOML:")
    lines = errors(tmp_path, 'default = "nothing"\nmodel = 3\n')
    assert f"{tmp_path / 'models.toml'}: unknown top-level key 'model' (expected default, [targets.NAME], [pairs.NAME])" in lines
    lines = errors(tmp_path, 'default = "nothing"\n')
    assert lines == [f"{tmp_path / 'models.toml'}: default: 'nothing' is not a pair of the catalog"]


def test_user_catalog_extends_and_overrides_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # platformdirs reads it on Linux
    if sys.platform != "linux":
        pytest.skip("the user config dir follows XDG_CONFIG_HOME on Linux only")
    assert user_catalog_path() == tmp_path / "config" / "dspark-chat" / "models.toml"
    assert load_catalog().files == (BUILTIN,)
    write(user_catalog_path(), 'default = "tiny-plain"\n' + TARGET + """

[pairs.tiny-plain]
description = "the tiny test model, no drafter"
target = "tiny"
kind = "none"
license = "MIT"

[pairs.qwen3-4b-dspark]
description = "pinned"
target = "qwen3-4b"
kind = "dspark"
block_size = 7
drafter = "deepseek-ai/dspark_qwen3_4b_block7"
drafter_revision = "0123456789abcdef0123456789abcdef01234567"
drafter_layers = 5
drafter_params = 1_393_133_569
drafter_dtype = "bfloat16"
drafter_download_bytes = 2_786_280_000
license = "MIT"
""")
    catalog = load_catalog()
    assert catalog.files == (BUILTIN, user_catalog_path())
    assert catalog.default == "tiny-plain"
    assert catalog.pair("tiny-plain").specs() == ("acme/tiny", None, False)
    pinned = catalog.pair("qwen3-4b-dspark")
    assert pinned.description == "pinned" and pinned.source == user_catalog_path()
    assert pinned.specs() == ("Qwen/Qwen3-4B", "deepseek-ai/dspark_qwen3_4b_block7@0123456789abcdef0123456789abcdef01234567", False)
    assert catalog.pair("qwen3-8b-dspark").source == BUILTIN  # the rest of the built-in catalog is still there
    # an error in the user's file names the user's file
    write(user_catalog_path(), "[pairs.bad]\ntarget = 'qwen3-4b'\nkind = 'eagle'\nlicense = 'MIT'\nblock_size = 7\n")
    with pytest.raises(CatalogError, match=rf"{user_catalog_path()}:3: \[pairs.bad\] kind: expected one of dspark, dflash"):
        load_catalog()


def test_unknown_pair_names_suggest_close_ones():
    with pytest.raises(CatalogError, match=r"'qwen3-8b-dspak' is not in the catalog \(did you mean qwen3-8b-dspark"):
        load_catalog([BUILTIN]).pair("qwen3-8b-dspak")


def test_an_installed_wheel_ships_and_finds_models_toml(tmp_path):
    """Build the wheel from a copy of the sources, unpack it, and import the catalog from there."""
    src = tmp_path / "src"
    for name in ("app", "engine", "decode_kernels", "models"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "models.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("dspark_chat-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("dspark_chat/models.toml") == BUILTIN.read_bytes()
        # the embedded pair's drafter, which the catalog's smollm2 pair names by leaving its drafter out
        assert z.read("dspark_chat/models/smollm2-dspark/config.json") == (SHIPPED_DRAFTERS["smollm2"] / "config.json").read_bytes()
        z.extractall(tmp_path / "site")
    code = ("import dspark_chat.engine.catalog as c; print(c.BUILTIN); "
            "print(len(c.load_catalog([c.BUILTIN]).pairs))")
    # -S: site-packages without its .pth files, so the editable install of this checkout cannot answer
    site = [p for p in sys.path if p.endswith("site-packages")]
    run = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path += {site!r}; " + code],
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / "site")}, timeout=120)
    assert run.returncode == 0, run.stderr
    path, count = run.stdout.split()
    assert Path(path) == tmp_path / "site" / "dspark_chat" / "models.toml"
    assert int(count) == len(load_catalog([BUILTIN]).pairs)
