"""Request statistics, computed from the Step events alone (as dicts, so any client of the event
stream can compute them the same way)."""

from __future__ import annotations


def summarize(steps: list[dict]) -> dict:
    """tau (tokens committed per verify round, the bonus token included), acceptance rate (accepted /
    verified drafts), per-position conditional acceptance (accepted at k / verified at k with 1..k-1
    accepted), decode tok/s (tokens after the first over the time since the first), time to first
    token, and the draft / verify time split."""
    rounds = [s for s in steps if not s.get("prefill")]
    tokens = sum(len(s["token_ids"]) for s in steps)
    round_tokens = sum(len(s["token_ids"]) for s in rounds)
    verified = sum(s["verified"] for s in rounds)
    accepted = sum(s["accepted"] for s in rounds)
    depth = max((s["verified"] for s in rounds), default=0)
    per_position = []
    for k in range(1, depth + 1):
        reached = sum(1 for s in rounds if s["verified"] >= k and s["accepted"] >= k - 1)
        per_position.append(sum(1 for s in rounds if s["accepted"] >= k) / reached if reached else None)
    first_ms = steps[0]["elapsed_ms"] if steps else 0.0
    decode_s = (steps[-1]["elapsed_ms"] - first_ms) / 1000 if steps else 0.0
    after_first = tokens - (len(steps[0]["token_ids"]) if steps else 0)
    return {
        "tokens": tokens,
        "rounds": len(rounds),
        "tau": round_tokens / len(rounds) if rounds else 0.0,
        "drafted": sum(len(s["draft_ids"]) for s in rounds),
        "verified": verified,
        "accepted": accepted,
        "acceptance_rate": accepted / verified if verified else 0.0,
        "acceptance_by_position": per_position,
        "decode_tokens_per_s": after_first / decode_s if decode_s > 0 else 0.0,
        "time_to_first_token_ms": first_ms,
        "draft_ms": sum(s["draft_ms"] for s in rounds),
        "verify_ms": sum(s["verify_ms"] for s in rounds),
        "finish_reason": steps[-1].get("finish_reason") if steps else None,
    }


def format_summary(stats: dict) -> str:
    split = stats["draft_ms"] + stats["verify_ms"]
    draft_share = 100 * stats["draft_ms"] / split if split else 0.0
    return (
        f"{stats['tokens']} tokens, {stats['decode_tokens_per_s']:.1f} tok/s, tau {stats['tau']:.2f}, "
        f"acceptance {100 * stats['acceptance_rate']:.0f}%, first token {stats['time_to_first_token_ms']:.0f} ms, "
        f"draft {draft_share:.0f}% of round time"
    )
