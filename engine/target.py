"""The target model as the decode loop sees it: one live sequence, a KV cache that can be rewound,
and the hidden states a drafter reads."""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .hybrid import HybridStates, stateful_layers

GROUPED_SDPA = "sdpa_grouped"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA, except that a masked pass over grouped-query heads reads each key/value head in
    place. transformers copies them out per query head whenever there is a mask (CUDA's fused kernels take
    grouped heads unmasked only), and every verify pass has one: on SmolLM2 in float32 on a CPU the copies
    made a 4-token pass 2-3 ms (5%) slower, more as the context grows. The CPU kernel takes both at once."""
    extras = any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux"))  # SDPA's to handle or refuse
    if attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1 or extras:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)  # the masks SDPA takes


class GrowingLayer(DynamicLayer):
    """A full-attention layer's keys and values in buffers with room to spare: a pass writes its rows in
    place where transformers' layer concatenates, which copies the whole cache on every pass (on SmolLM2
    after 3,000 tokens, 6 ms of a 77 ms step), and a rollback only shortens the view. The room never goes
    past `limit` positions (the context length), so memory planned for the context is not exceeded."""

    def __init__(self, limit: int = 1 << 30):
        super().__init__()
        self.limit = limit

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            capacity = max(end, min(max(256, 2 * end), self.limit))
            self.buffers = tuple(self._grown(old, new, capacity)
                                 for old, new in zip(self.buffers or (None, None), (key_states, value_states)))
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.length : end, :] = new
        self._use(end)
        return self.keys, self.values

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if old is not None:
            buffer[..., : self.length, :] = old[..., : self.length, :]
        return buffer

    def _use(self, length: int) -> None:
        self.length = length
        self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to drop, negated; got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self._use(max(0, self.length + tokens_to_remove))


class TokenLog:
    """The ids a cache holds. Ids that arrive as a device tensor (a verify pass over drafts still on the
    device) are read only when asked for, between requests or to rebuild a cache, so that a pass and its
    rollback never wait for the device to hand its input back."""

    def __init__(self):
        self.known: list[int] = []
        self.unread: list[torch.Tensor] = []
        self.length = 0

    def extend(self, ids: list[int] | torch.Tensor) -> None:
        if torch.is_tensor(ids):
            self.unread.append(ids)
        else:
            self.read().extend(ids)
        self.length += len(ids)

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        del self.known[length:]
        room, kept = length - len(self.known), []
        for ids in self.unread:
            if room > 0:
                kept.append(ids[:room])
                room -= len(kept[-1])
        self.unread, self.length = kept, length

    def read(self) -> list[int]:
        if self.unread:
            self.known += torch.cat([ids.to(self.unread[0].device) for ids in self.unread]).tolist()
            self.unread.clear()
        return self.known


class Target:
    def __init__(self, model, tokenizer, name: str, cpu_linear: dict | None = None):
        self.model = model.eval()
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(GROUPED_SDPA)
        self.cpu_linear = cpu_linear or {}  # how its CPU matrix products run (engine/cpu_linear.py)
        self.tokenizer = tokenizer
        self.name = name
        text_config = model.config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(text_config.vocab_size)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 30)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.device = model.get_input_embeddings().weight.device
        # Where the logits come out (the last shard when the model is split over devices): sampling
        # and the drafter work there.
        head = model.get_output_embeddings()
        self.output_device = head.weight.device if head is not None and head.weight.device.type != "meta" else self.device
        self.stop_ids = _stop_ids(model, tokenizer)
        # Later transformers 5 releases name the cache argument `cache` and warn on `past_key_values`.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.rewind(0)

    @property
    def attention(self) -> str:
        """The attention implementation: passes time differently with each."""
        return self.model.config._attn_implementation

    @property
    def speculation_refusal(self) -> str | None:
        """Why speculative decoding cannot run on this target, or None when its cache rolls back exactly."""
        return self.hybrid.refusal(self.name) if self.hybrid else None

    def rewind(self, length: int) -> None:
        """Keep the cache for the first `length` tokens only."""
        if length <= 0:
            self.cache = DynamicCache(config=self.model.config)
            self.cache.layers = [GrowingLayer(self.max_length) if type(layer) is DynamicLayer else layer
                                 for layer in self.cache.layers]
            # Sliding-window layers (Gemma 4) keep only the last window of keys and values, and refuse to
            # crop once the sequence is longer than the window; recording each pass's states until the
            # next crop lets the rejected drafts of a verify pass be dropped.
            # Convolution layers (hybrid targets) keep their inputs the same way.
            self.cache.activate_past_recording()
            self.hybrid = HybridStates(self.model, self.cache) if stateful_layers(self.cache) else None
            self.log = TokenLog()
            return
        drop = self.log.length - length
        if drop <= 0:
            return
        if self._sliding_layers_reach_back(drop) and (self.hybrid is None or self.hybrid.holds(drop)):
            self._crop_keys_and_values(drop)
            if self.hybrid:
                self.hybrid.drop(drop)
            self.log.truncate(length)
            return
        # Further back than the caches hold (a new turn that edits older text): rebuild, from the checkpoint the
        # recurrent and convolution layers keep after a prefill where there is one.
        kept = self.cached_ids[:length]
        start = self.hybrid.checkpoint_at(length) if self.hybrid else 0
        if start and self._sliding_layers_reach_back(self.log.length - start):
            self._crop_keys_and_values(self.log.length - start)
            self.hybrid.restore_checkpoint()
            self.log.truncate(start)
        else:
            self.rewind(0)
        if len(kept) > self.log.length:
            self.forward(kept[self.log.length :], last_only=True)

    @property
    def cached_ids(self) -> list[int]:
        return self.log.read()

    def _crop_keys_and_values(self, drop: int) -> None:
        """Crop every layer's keys and values; the states are HybridStates'. A layer with keys and values beside
        its states (Falcon-H1's) is cropped by its attention class alone, the one after the states' class in its
        MRO: from transformers 5.25 its own crop also puts back a recurrent state of its own recording, a new tensor
        from a history that holds only the state before the pass here (`recurrent_states_to_keep` is 0)."""
        for layer in self.cache.layers:
            if not isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.crop(-drop)
            elif isinstance(layer, CacheLayerMixin):
                super(LinearAttentionCacheLayerMixin, layer).crop(-drop)

    def _sliding_layers_reach_back(self, drop: int) -> bool:
        """Whether every sliding-window layer holds the window that ends `drop` positions before the end."""
        total = self.log.length
        for layer in self.cache.layers:
            window = getattr(layer, "sliding_window", None)
            if window and layer.is_initialized and layer.keys.shape[-2] < min(window - 1, total - drop) + drop:
                return False
        return True

    @torch.inference_mode()
    def forward(
        self, ids: list[int] | torch.Tensor, feature_layers: tuple[int, ...] = (), last_only: bool = False, feature_device=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ids (a list, or a tensor on the device) after the cached ones. Returns logits [n or 1, V] and,
        if asked, the hidden states at feature_layers concatenated per position [n, len(layers) * d]
        (layer i is the output of decoder layer i, -1 the embeddings)."""
        new = len(ids)
        if self.hybrid and not self.hybrid.verified and self.log.length and new > 1:
            # This family's layers cannot run several tokens on from a cached state (Jamba): run them all again.
            ids = self.cached_ids + (ids.tolist() if torch.is_tensor(ids) else list(ids))
            self.rewind(0)
        start = self.log.length
        # Verify passes keep each position's recurrent state, so that a rollback is exact (engine/hybrid.py).
        with self.hybrid.per_position(not last_only) if self.hybrid else nullcontext():
            out = self.model(
                input_ids=device_ids(ids, self.device)[None],
                # Explicit, as not every model counts them on from its cache (Bamba starts again at 0).
                position_ids=torch.arange(start, start + len(ids), device=self.device)[None],
                **{self._cache_argument: self.cache},
                use_cache=True,
                output_hidden_states=bool(feature_layers),
                logits_to_keep=1 if last_only else new,
            )
        self.log.extend(ids)
        if self.hybrid:
            self.hybrid.passed(len(ids))
            if last_only:
                self.hybrid.save_checkpoint(self.log.length)
        features = None
        if feature_layers:
            device = feature_device or out.hidden_states[-1].device
            features = torch.cat([out.hidden_states[i + 1][0, -new:].to(device) for i in feature_layers], -1)
        return out.logits[0], features


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    ids = []
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        for i in [value] if isinstance(value, int) else value or []:
            if i is not None and i not in ids:
                ids.append(int(i))
    return tuple(ids)


def device_ids(ids: list[int] | torch.Tensor, device) -> torch.Tensor:
    """Token ids as a tensor on the device. A host list is copied without waiting for the device (a
    blocking copy would wait for every queued kernel first); a small copy is staged by the driver."""
    return (ids if torch.is_tensor(ids) else torch.tensor(ids)).to(device, non_blocking=True)
