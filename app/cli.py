"""The `dspark-chat` command: with no command it opens the terminal app; engine commands run as
`python -m dspark_chat.engine` in this process's place, so the client never imports torch."""

from __future__ import annotations

import os
import sys

ENGINE_COMMANDS = {"generate": "answer one prompt and print decoding statistics", "serve": "OpenAI-compatible engine server with live speculative-decoding stats",
                   "pull": "download a model pair ahead of time", "models": "list the catalog, what is downloaded and what fits",
                   "bench": "measure decoding modes side by side on a prompt file",
                   "train": "train a DSpark drafter for a target (online distillation)",
                   "export": "write a drafter in a layout other engines load (speculators or DeepSpec's)"}

USAGE = """usage: dspark-chat [--model PAIR | --engine-url URL [--api-key KEY]] [--compile auto|on|off]
       dspark-chat COMMAND [options]

With no command, opens the chat app: pick a pair, chat, compare speculation on and off.
  --model PAIR       start this catalog pair at once (`dspark-chat models` lists them)
  --engine-url URL   use an engine that is already running: ours or any OpenAI-compatible server
  --api-key KEY      the key that server wants
  --compile auto|on|off  the engine's passes compiled (auto: on a GPU)

commands:
{commands}

`dspark-chat COMMAND --help` explains each."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ENGINE_COMMANDS:
        os.execv(sys.executable, [sys.executable, "-m", "dspark_chat.engine", *argv])
    if argv and (argv[0] in ("-h", "--help") or not argv[0].startswith("-")):
        print(USAGE.format(commands="\n".join(f"  {name:<10} {text}" for name, text in ENGINE_COMMANDS.items())))
        if argv[0] not in ("-h", "--help"):
            print(f"\ndspark-chat: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from .tui import main as run_app

    return run_app(argv)


if __name__ == "__main__":
    sys.exit(main())
