"""One drafter's acceptance in dspark-chat and in llama.cpp's server, on the same prompts' token ids.

dspark-chat runs with the scheduler off (every drafted token verified, as llama.cpp does with
--spec-draft-p-min 0); llama-server must already run the same target and the drafter converted by its
own convert_hf_to_gguf.py (docs/speculators.md gives every command):

    llama-server -m TARGET.gguf -md DRAFTER.gguf --spec-type draft-dspark --spec-draft-n-max 7 \\
        --spec-draft-p-min 0 -np 1 -t 2 --port 18080
    python bench/llama_cpp_acceptance.py --drafter DIR --server http://127.0.0.1:18080 \\
        --prompts /work/shared/bench/humaneval.jsonl /work/shared/bench/gsm8k.jsonl --limit 5

Both decode greedily from the token ids dspark-chat's chat template makes, up to --max-new-tokens.
Acceptance is accepted drafts over drafts verified (llama.cpp: timings.draft_n_accepted / draft_n); tau
is 1 + accepted drafts per target pass after the prompt's, both over all prompts. The outputs
are compared too: where the two engines' float arithmetic parts on a near-tie, the greedy texts part,
and the drafts after that differ.
"""

from __future__ import annotations

import argparse
import json

import httpx


def read_prompts(path: str, limit: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["turns"][0] for line in f if line.strip()][:limit]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--server", required=True, help="llama-server's URL")
    parser.add_argument("--prompts", required=True, nargs="+", help="jsonl files with {'turns': [prompt]} lines")
    parser.add_argument("--limit", type=int, default=5, help="prompts taken from each file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--float-drafter", action="store_true", help="dspark-chat's drafter in float (int8 otherwise on x86)")
    args = parser.parse_args()

    from dspark_chat.engine.engine import Engine

    engine = Engine.load(args.target, args.drafter, scheduler="off", float_drafter=args.float_drafter)
    ours = {"drafted": 0, "accepted": 0, "rounds": 0}
    theirs = {"drafted": 0, "accepted": 0, "rounds": 0}
    prompts = [p for path in args.prompts for p in read_prompts(path, args.limit)]
    print("prompt | dspark-chat accepted/drafted, rounds | llama.cpp accepted/drafted, rounds | same tokens")
    for i, prompt in enumerate(prompts):
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        steps = list(engine.generate(ids, max_new_tokens=args.max_new_tokens))
        rounds = [s for s in steps if not s.prefill]
        accepted, drafted = sum(s.accepted for s in rounds), sum(s.verified for s in rounds)
        ours["drafted"] += drafted
        ours["accepted"] += accepted
        ours["rounds"] += len(rounds)
        tokens = [t for s in steps for t in s.token_ids]
        reply = httpx.post(f"{args.server}/completion", timeout=600, json={
            "prompt": ids, "n_predict": args.max_new_tokens, "temperature": 0, "top_k": 1, "cache_prompt": False,
            "return_tokens": True}).json()
        their_accepted, their_drafted = reply["timings"].get("draft_n_accepted", 0), reply["timings"].get("draft_n", 0)
        # The prompt's pass commits the first token, and every verify round its accepted drafts and one more.
        their_rounds = reply["timings"]["predicted_n"] - 1 - their_accepted
        theirs["drafted"] += their_drafted
        theirs["accepted"] += their_accepted
        theirs["rounds"] += their_rounds
        print(f"{i + 1} | {accepted}/{drafted}, {len(rounds)} | {their_accepted}/{their_drafted}, {their_rounds} | "
              f"{common_prefix(tokens, reply['tokens'])} of {len(tokens)}/{len(reply['tokens'])}", flush=True)
    print(f"\n{len(prompts)} prompts, {args.max_new_tokens} tokens at most, greedy")
    for name, n in (("dspark-chat, scheduler off", ours), ("llama.cpp draft-dspark", theirs)):
        print(f"{name}: acceptance {n['accepted'] / max(n['drafted'], 1):.1%} ({n['accepted']}/{n['drafted']}), "
              f"tau {1 + n['accepted'] / max(n['rounds'], 1):.2f} ({n['rounds']} rounds)")


if __name__ == "__main__":
    main()
