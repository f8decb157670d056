"""Exact rollback for hybrid targets: layers that keep a convolution state (LFM2) or a recurrent state as well
(Gated DeltaNet in Qwen3.5 and Qwen3-Next; Mamba-2 in Nemotron-H, Granite 4, Falcon-H1 and Bamba) beside
attention. Keys and values are cropped; these states are not sums over positions that can be cut, so a verify
pass keeps every position's state and the rollback puts back the one after the last token kept.

- Convolution states: transformers' past recording keeps a pass's inputs (the state is the last few of them),
  so the state after any position of the last pass is a slice.
- Recurrent states: during a verify pass the layer's multi-token scan is replaced by its own one-token step
  (the function transformers calls for plain decoding, or the fla / mamba_ssm kernel it dispatches to), run
  position by position, which yields each position's state at no extra matrix product. The families and their
  scans: engine/hybrid_families.py.

Chosen for every family over the other way, a snapshot before the pass and a recomputation of the kept tokens on
a rejection, by measurement (bench/hybrid_rollback.py, docs/hybrid.md; random Qwen3.5 and Nemotron-H models at
hidden 2048, CPU time on one thread): per-position states cost -8% to +7% of a round that rolls nothing back (on a
CPU the one-token recurrence is no slower than the chunked scan, padded to its chunk), where recomputing the kept
tokens cost 5-40% more on rejecting rounds through the recurrent layers' mixers alone, 23-79% through the model.

Further back than the last pass (a new turn that edits older text), the states come from the checkpoint taken
after the last prefill, or from an empty cache, and the tokens after it are run again."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from .hybrid_families import SCANS, UNSUPPORTED


def stateful_layers(cache) -> list:
    return [layer for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]


@dataclass
class Checkpoint:
    length: int
    conv: list[dict]
    recurrent: list[dict]


class HybridStates:
    """The convolution and recurrent states of a target's cache, kept per position over the last pass."""

    def __init__(self, model, cache):
        self.layers = stateful_layers(cache)
        for layer in self.layers:
            # transformers 5.25 runs the last `recurrent_states_to_keep` positions of a pass one at a time to keep
            # their states, and its scans fail on the None that past recording leaves there; the per-position scans
            # here keep the states, so none.
            if hasattr(layer, "recurrent_states_to_keep"):
                layer.recurrent_states_to_keep = 0
        self.model_type = model.config.get_text_config().model_type
        # Whether tests/test_hybrid.py checks this family: then its states roll back exactly and its multi-token
        # passes continue from a cached state. Others decode plainly, and re-run the context for a multi-token pass.
        self.verified = self.model_type in SCANS
        scan = SCANS.get(self.model_type)
        self.module = sys.modules[type(model).__module__]
        self.scan_name = scan[0] if scan else None
        self.chunked = getattr(self.module, self.scan_name) if scan else None
        self.step = {"gated_delta": self._gated_delta_steps, "mamba2": self._mamba2_steps}[scan[1]] if scan else None
        self.pass_length = 0  # positions the last pass ran
        self.kept = 0  # of those, how many the states are at now
        self.histories: list[dict] = []  # per layer: state index -> convolution inputs up to the end of the last pass
        self.steps: dict[int, list[torch.Tensor]] = {}  # id of a recurrent state buffer -> its state before each position
        self.checkpoint: Checkpoint | None = None

    def refusal(self, name: str) -> str | None:
        """Why speculative decoding cannot run on this target, or None."""
        if self.verified:
            return None
        why = UNSUPPORTED.get(self.model_type, f"dspark-chat rolls back the states of {', '.join(SCANS)} only")
        return (f"{name} ({self.model_type}) has layers that keep a recurrent or convolution state, which a verify "
                f"pass runs over the drafts it rejects too: {why}; speculative decoding would not give the model's "
                f"own text. Run it without a drafter or prompt lookup: --no-spec (or `speculative: false` in a "
                f"request) decodes plainly.")

    @contextmanager
    def per_position(self, active: bool):
        """Runs the recurrent layers' scans one position at a time inside the block, keeping each state."""
        self.steps = {}
        if not active or self.scan_name is None:
            yield
            return
        setattr(self.module, self.scan_name, self.step)
        try:
            yield
        finally:
            setattr(self.module, self.scan_name, self.chunked)

    def passed(self, tokens: int) -> None:
        """After a pass over `tokens` positions: keep the convolution inputs, and cut the live states back to what
        the next pass reads (past recording would otherwise grow them with the whole context, and from transformers
        5.25 keep a copy of the recurrent state before every pass)."""
        self.pass_length = self.kept = tokens
        self.histories = []
        for layer in self.layers:
            self.histories.append({i: s for i, s in layer.conv_states.items() if s is not None})
            # The states' crop alone: a layer with a sliding window beside its states ("hybrid_sliding") would
            # cut the window's keys back too, which a rollback of this pass still reads.
            LinearAttentionCacheLayerMixin.crop(layer, 0)

    def holds(self, drop: int) -> bool:
        """Whether the states after dropping the last `drop` positions are at hand."""
        if drop > self.kept:
            return False
        recurrent = [id(s) for layer in self.layers for s in layer.recurrent_states.values() if s is not None]
        return all(key in self.steps for key in recurrent)

    @torch.inference_mode()  # the states are inference tensors (Target.forward), updated in place here
    def drop(self, drop: int) -> None:
        """Put back the states as they were `drop` positions earlier, inside the last pass (see `holds`)."""
        if drop == 0:
            return
        self.kept -= drop
        for layer, histories in zip(self.layers, self.histories):
            for i, history in histories.items():
                end = history.shape[-1] - (self.pass_length - self.kept)
                layer.conv_states[i] = history[..., max(0, end - layer.conv_kernel_size[i]) : end]
            for state in layer.recurrent_states.values():
                if state is not None:
                    state.copy_(self.steps[id(state)][self.kept])
            if hasattr(layer, "cumulative_length_linear"):  # transformers 5.25: cache.get_seq_length() reads layer 0's
                layer.cumulative_length_linear.sub_(drop)

    def save_checkpoint(self, length: int) -> None:
        if not self.verified:
            return  # its multi-token passes cannot continue from a state: Target runs the context again instead
        self.checkpoint = Checkpoint(
            length,
            [{i: s.clone() for i, s in layer.conv_states.items() if s is not None} for layer in self.layers],
            [{i: s.clone() for i, s in layer.recurrent_states.items() if s is not None} for layer in self.layers],
        )

    def checkpoint_at(self, length: int) -> int:
        """The position of the checkpoint if it lies at or before `length` (a later one is dropped), else 0."""
        if self.checkpoint is not None and self.checkpoint.length > length:
            self.checkpoint = None
        return self.checkpoint.length if self.checkpoint else 0

    @torch.inference_mode()
    def restore_checkpoint(self) -> None:
        for layer, conv, recurrent in zip(self.layers, self.checkpoint.conv, self.checkpoint.recurrent):
            for i, saved in conv.items():
                layer.conv_states[i] = saved.clone()
            for i, saved in recurrent.items():
                layer.recurrent_states[i].copy_(saved)
            if hasattr(layer, "cumulative_length_linear"):
                layer.cumulative_length_linear.fill_(self.checkpoint.length)
        self.pass_length = self.kept = 0
        self.steps = {}

    def _gated_delta_steps(self, query, key, value, g, beta, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, **kwargs):
        """Gated DeltaNet's chunked scan, run as its one-token recurrence (which returns a new state each step)."""
        if initial_state is None:
            return self.chunked(query, key, value, g=g, beta=beta, output_final_state=output_final_state,
                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
        step = self.module.torch_recurrent_gated_delta_rule
        states, outputs, state = [initial_state.clone()], [], initial_state
        for t in range(query.shape[1]):
            out, state = step(query[:, t : t + 1], key[:, t : t + 1], value[:, t : t + 1], g=g[:, t : t + 1],
                              beta=beta[:, t : t + 1], initial_state=state, output_final_state=True,
                              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            outputs.append(out)
            states.append(state)
        self.steps[id(initial_state)] = states
        return torch.cat(outputs, 1), state

    def _mamba2_steps(self, hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                      dt_softplus=False, return_final_states=False, **kwargs):
        """Mamba-2's chunked scan, run as the one-token state update plain decoding uses (which updates the state
        in place, so each position gets a copy). Shapes as the mixers pass them to each: [batch, length, heads,
        head_dim] inputs and [batch, length, groups, state] B and C here; per head and head_dim there. The chunked
        scan's dt_limit clamp is left out as plain decoding's step leaves it out: the states are plain decoding's."""
        if initial_states is None or not return_final_states or kwargs.get("z") is not None:
            # No state to continue (or a gate inside the scan, which the mixers here never pass): no positions kept,
            # and a rollback into this pass rebuilds from the checkpoint.
            return self.chunked(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                                initial_states=initial_states, dt_softplus=dt_softplus,
                                return_final_states=return_final_states, **kwargs)
        head_dim, size = hidden_states.shape[-1], B.shape[-1]
        A = A[:, None, None].expand(-1, head_dim, size)
        D, dt_bias = D[:, None].expand(-1, head_dim), dt_bias[:, None].expand(-1, head_dim)
        state = initial_states.clone()
        states, outputs = [state.clone()], []
        for t in range(hidden_states.shape[1]):
            outputs.append(self.module.mamba2_selective_state_update(
                state, hidden_states[:, t], dt[:, t, :, None].expand(-1, -1, head_dim), A, B[:, t], C[:, t], D,
                z=None, dt_bias=dt_bias, dt_softplus=dt_softplus))
            states.append(state.clone())
        self.steps[id(initial_states)] = states
        return torch.stack(outputs, 1), state
