"""scripts/stdlib_prompts.py: code-writing training prompts from the standard library, the same on every run,
or from installed packages."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from dspark_chat.engine.train import read_prompts

SCRIPT = Path(__file__).parents[1] / "scripts" / "stdlib_prompts.py"


def make(out: Path, hash_seed: str, *args: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, DSPARK_PROBE="a value no prompt may show")
    subprocess.run([sys.executable, str(SCRIPT), str(out), *args], check=True, env=env, capture_output=True)
    return out.read_text()


def test_prompts_are_function_stubs_and_do_not_depend_on_the_process(tmp_path):
    text = make(tmp_path / "a.jsonl", "1")
    assert make(tmp_path / "b.jsonl", "2") == text  # set order, addresses, environment
    assert not re.search(r" at 0x[0-9a-f]{6,}", text) and "DSPARK_PROBE" not in text  # os.environ is cgi.parse's default
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) > 300 and len({r["source"] for r in rows}) == len(rows)
    if sys.version_info < (3, 13):  # cgi, whose parse() defaults to os.environ, left the standard library in 3.13
        assert "cgi.parse" in {r["source"] for r in rows}
    (prompts,) = read_prompts([str(tmp_path / "a.jsonl")])
    for prompt, row in zip(prompts, rows):
        *owner, name = row["source"].split(".")
        assert f"def {name}(" in prompt and prompt.endswith('"""\n```')
        if len(owner) == 2:  # module.Class.method
            assert f"```python\nclass {owner[1]}:\n    def {name}(" in prompt
    assert any(len(r["source"].split(".")) == 3 for r in rows) and any(len(r["source"].split(".")) == 2 for r in rows)
    assert make(tmp_path / "c.jsonl", "1", "--limit", "50", "--seed", "1") != make(tmp_path / "d.jsonl", "1", "--limit", "50")


def test_a_later_slice_continues_the_list_and_a_longer_list_keeps_a_shorter_one(tmp_path):
    whole = make(tmp_path / "a.jsonl", "1").splitlines()
    assert make(tmp_path / "b.jsonl", "1", "--limit", "30").splitlines() == whole[:30]
    assert make(tmp_path / "c.jsonl", "1", "--start", "30", "--limit", "20").splitlines() == whole[30:50]
    functions = [line for line in whole if len(json.loads(line)["source"].split(".")) == 2]
    assert whole[: len(functions)] == functions  # functions first: adding methods did not reorder them
    refused = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "e.jsonl"), "--start", "-1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--start must be 0 or more" in refused.stderr and not (tmp_path / "e.jsonl").exists()


DOC = '"""Something this function does, described at more length than forty characters."""'


def test_packages_give_the_public_functions_of_their_modules_whatever_importing_them_does(tmp_path):
    root = tmp_path / "site"
    files = {
        "demo/__init__.py": "",
        "demo/good.py": f"def add_pairs(a, b=2):\n    {DOC}\n\nclass Box:\n    def fill(self, n):\n        {DOC}\n",
        "demo/noisy.py": f"print('hello from noisy')\ndef noisy_fn(x):\n    {DOC}\n",
        "demo/exits.py": f"raise SystemExit('bye')\ndef lost(x):\n    {DOC}\n",
        "demo/argv.py": f"import sys\nassert len(sys.argv) == 1, 'reads the command line'\ndef argv_fn(x):\n    {DOC}\n",
        "demo/_private.py": f"def hidden(x):\n    {DOC}\n",
        "demo/tests/__init__.py": "",
        "demo/tests/test_good.py": f"def test_add(x):\n    {DOC}\n",
        "demo/sub/__init__.py": "",
        "demo/sub/deep.py": f"def deep_fn(x, *, y=None):\n    {DOC}\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(root))
    out = tmp_path / "demo.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--packages", "demo"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "hello from noisy" not in done.stdout + done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["source"] for r in rows) == ["demo.argv.argv_fn", "demo.good.Box.fill", "demo.good.add_pairs",
                                                  "demo.noisy.noisy_fn", "demo.sub.deep.deep_fn"]
    (prompts,) = read_prompts([str(out)])
    assert any("def deep_fn(x, *, y=None):" in p for p in prompts)
    refused = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.jsonl"), "--packages", "demo", "no_such_pkg"],
                             env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "not installed: no_such_pkg" in refused.stderr and not (tmp_path / "none.jsonl").exists()
