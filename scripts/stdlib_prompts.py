"""Write code-writing prompts made from the Python standard library's own functions: each prompt shows a
function's signature and docstring and asks for its body. Training data for drafters of chat models that
write code; nothing here comes from an evaluation set.

    python scripts/stdlib_prompts.py OUT.jsonl [--limit N] [--seed S]

The prompts depend on the Python version that runs this (its standard library), not on the machine.
"""
import argparse
import importlib
import inspect
import json
import random
import sys
import warnings

# Modules that open windows, print, play sound or change the process when imported.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "winsound", "msvcrt", "winreg",
        "_winapi", "nturl2path", "ntpath", "lib2to3", "ensurepip", "venv", "pydoc_data", "__phello__", "xxlimited"}
ASKS = [
    "Implement this Python function:",
    "Complete the following function. Keep its signature.",
    "Write the body of this function in Python:",
    "Here is a function stub with its docstring. Write an implementation.",
]
MAX_DOC_LINES = 12


class Unshown:
    def __repr__(self) -> str:
        return "..."


def literal(default):
    """A default value as the prompt shows it: literals as they are, anything else as `...`. Other
    reprs carry memory addresses or this process's state (os.environ is one module's default)."""
    simple = (type(None), bool, int, float, str, bytes)
    if default is inspect.Parameter.empty or isinstance(default, simple) and len(repr(default)) <= 40:
        return default
    if isinstance(default, tuple) and all(isinstance(v, simple) for v in default) and len(repr(default)) <= 80:
        return default
    return Unshown()


def functions(module_names) -> dict[tuple[str, str], str]:
    """(module, name) -> source of a stub: the signature and docstring of public pure-Python functions."""
    stubs = {}
    for module_name in sorted(module_names):
        if module_name in SKIP or module_name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception:  # platform-specific modules; absent optional C libraries
            continue
        for name, value in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(value) or value.__module__ != module_name:
                continue
            doc = inspect.getdoc(value)
            if not doc or len(doc) < 40:
                continue
            try:
                signature = inspect.signature(value)
            except (TypeError, ValueError):
                continue
            signature = signature.replace(parameters=[p.replace(default=literal(p.default)) for p in signature.parameters.values()])
            lines = doc.splitlines()[:MAX_DOC_LINES]
            body = "\n".join(f"    {line}".rstrip() for line in lines)
            stubs[(module_name, name)] = f'def {name}{signature}:\n    """\n{body}\n    """\n'
    return stubs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--limit", type=int, help="at most N prompts (a seeded random choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stubs = functions(sys.stdlib_module_names)
    keys = sorted(stubs)
    random.Random(args.seed).shuffle(keys)
    keys = keys[: args.limit] if args.limit else keys
    with open(args.out, "w") as f:
        for number, key in enumerate(keys):
            prompt = f"{ASKS[number % len(ASKS)]}\n```python\n{stubs[key]}```"
            f.write(json.dumps({"turns": [prompt], "source": f"{key[0]}.{key[1]}"}) + "\n")
    print(f"{len(keys)} prompts from {len(stubs)} standard-library functions (Python {sys.version.split()[0]}) -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
