"""The `dspark-chat` command. Engine commands run as `python -m dspark_chat.engine` in this
process's place, so the client never imports torch."""

from __future__ import annotations

import os
import sys

ENGINE_COMMANDS = {"generate": "answer one prompt and print decoding statistics", "serve": "OpenAI-compatible engine server with live speculative-decoding stats",
                   "pull": "download a model pair ahead of time", "models": "list the catalog, what is downloaded and what fits",
                   "bench": "measure decoding modes side by side on a prompt file",
                   "train": "train a DSpark drafter for a target (online distillation)"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ENGINE_COMMANDS:
        args = [sys.executable, "-m", "dspark_chat.engine", *argv]
        os.execv(sys.executable, args)
    commands = "\n".join(f"  {name:<10} {text}" for name, text in ENGINE_COMMANDS.items())
    print(f"usage: dspark-chat COMMAND [options]\n\ncommands:\n{commands}\n\n`dspark-chat COMMAND --help` explains each.")
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
