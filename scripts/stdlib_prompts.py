"""Write code-writing prompts made from the Python standard library's own functions and methods (or, with
--packages, those of installed packages): each prompt shows a signature and docstring and asks for the body.
Training data for drafters of chat models that write code; nothing here comes from an evaluation set.

    python scripts/stdlib_prompts.py OUT.jsonl [--packages NAME ...] [--start N] [--limit N] [--seed S]

The prompts depend on the Python version that runs this (its standard library), or on the installed
versions of the packages, not on the machine.
"""
import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import pkgutil
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


def stub(name: str, function, indent: str = "") -> str | None:
    """The signature and docstring of a function, as source; None when it has no useful docstring."""
    doc = inspect.getdoc(function)
    if not doc or len(doc) < 40:
        return None
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    signature = signature.replace(parameters=[p.replace(default=literal(p.default)) for p in signature.parameters.values()])
    body = "\n".join(f"{indent}    {line}".rstrip() for line in doc.splitlines()[:MAX_DOC_LINES])
    return f'{indent}def {name}{signature}:\n{indent}    """\n{body}\n{indent}    """\n'


def quiet_import(name: str):
    """The module, or None when importing it fails or exits (platform-specific modules, absent optional
    libraries, a package's command-line entry). What it prints on import is dropped: prompts only."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def package_modules(name: str) -> list[str]:
    """A package and its public submodules, tests and command-line entries left out."""
    package = quiet_import(name)
    if package is None:
        return []
    names = [name]
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        if info.name.startswith(("_", "test")) or info.name in ("conftest", "cli"):
            continue
        child = f"{name}.{info.name}"
        names += package_modules(child) if info.ispkg else [child]
    return names


def stubs(module_names) -> tuple[dict[str, str], dict[str, str]]:
    """Stubs of public pure-Python functions and of public methods of public classes, by dotted name."""
    functions, methods = {}, {}
    for module_name in sorted(module_names):
        if module_name in SKIP or module_name.startswith("_"):
            continue
        module = quiet_import(module_name)
        if module is None:
            continue
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module_name:
                continue
            if inspect.isfunction(value) and (source := stub(name, value)):
                functions[f"{module_name}.{name}"] = source
            elif inspect.isclass(value):
                for method_name, method in vars(value).items():
                    if not method_name.startswith("_") and inspect.isfunction(method) and (source := stub(method_name, method, "    ")):
                        methods[f"{module_name}.{name}.{method_name}"] = f"class {name}:\n{source}"
    return functions, methods


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--packages", nargs="+", metavar="NAME",
                        help="installed packages (import names) to take the functions and methods of, instead of the standard library's")
    parser.add_argument("--start", type=int, default=0, help="skip the first N prompts of the list")
    parser.add_argument("--limit", type=int, help="at most N prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.start < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--start must be 0 or more and --limit 1 or more")
    sys.argv = sys.argv[:1]  # some modules read the command line when imported
    if args.packages:
        missing = [name for name in args.packages if not installed(name)]
        if missing:
            parser.error(f"not installed: {', '.join(missing)} (give import names, e.g. yaml for PyYAML)")
        functions, methods = stubs(sorted({m for name in args.packages for m in package_modules(name)}))
        origin = f"functions of {', '.join(args.packages)}"
    else:
        functions, methods = stubs(sys.stdlib_module_names)
        origin = "standard-library functions"
    # Functions first, then methods, each shuffled: a longer list keeps the prompts of a shorter one.
    names = []
    for group in (functions, methods):
        keys = sorted(group)
        random.Random(args.seed).shuffle(keys)
        names += keys
    source = functions | methods
    end = len(names) if args.limit is None else args.start + args.limit
    with open(args.out, "w") as f:
        for number in range(args.start, min(end, len(names))):
            prompt = f"{ASKS[number % len(ASKS)]}\n```python\n{source[names[number]]}```"
            f.write(json.dumps({"turns": [prompt], "source": names[number]}) + "\n")
    print(f"{max(0, min(end, len(names)) - args.start)} prompts of {len(names)} ({len(functions)} {origin}, "
          f"then {len(methods)} methods; Python {sys.version.split()[0]}) -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
