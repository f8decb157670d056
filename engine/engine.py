"""The Python API: load a target and a drafter, then stream Step events for prompts or chats."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

from .catalog import shipped_drafter
from .compiled import CompiledTarget, compile_drafter, compile_target, verify_width, wants_compile
from .decode import Drafter, Step, decode
from .dspark import DSparkDrafter
from .loading import LoadError, cache_dir, load_drafter, load_target, model_dir
from .prompt_lookup import LookupOrDraft, PromptLookupDrafter
from .sampling import Sampling
from .scheduler import Scheduler, load_calibration, sps_profile
from .target import Target


class Engine:
    def __init__(self, target: Target, drafter: Drafter | None = None, scheduler: Scheduler | None = None):
        self.target = target
        self.drafter = drafter
        self.scheduler = scheduler or Scheduler(mode="off")

    @classmethod
    def load(
        cls,
        target: str,
        drafter: str | None = None,
        prompt_lookup: bool = False,
        dtype: str = "auto",
        device: str | None = None,
        scheduler: str = "auto",
        threshold: float = 0.5,
        calibration: str | None = None,
        default_drafter: bool = True,
        placement=None,
        float_drafter: bool = False,
        measuring=None,
        compile: str = "off",
        max_length: int | None = None,
        announce=None,
    ) -> "Engine":
        """A drafter with prompt lookup copies where the context repeats itself and drafts with the model
        elsewhere (LookupOrDraft). With neither asked for, a target with a shipped drafter gets it with
        prompt lookup, the fastest way on code and maths and close to prompt lookup alone on chat
        (README, "The shipped drafter"; `default_drafter=False` loads no drafter: plain decoding). On an x86
        CPU the drafter runs in int8 unless `float_drafter` (load_drafter). `measuring` is called if the
        target's CPU products get measured (a first start; load_target). `compile` is on, off or auto
        (compiled.wants_compile); `announce` gets the line that says compiling started and how long it takes.
        `max_length` caps the context, which the compiled target's cache is made for."""
        if not drafter and not prompt_lookup and default_drafter:
            drafter = shipped_drafter(target)
            prompt_lookup = drafter is not None
        loaded = load_target(target, dtype, device, placement, measuring)
        draft: Drafter | None = PromptLookupDrafter() if prompt_lookup else None
        plan = Scheduler(mode=scheduler, threshold=threshold)
        if drafter:
            folder = model_dir(drafter)
            draft = load_drafter(str(folder), loaded, int8=not float_drafter)
            if prompt_lookup:
                draft = LookupOrDraft(draft)
            plan.temperatures = load_calibration(Path(calibration)) if calibration else folder_calibration(folder)
        if max_length:
            loaded.max_length = min(loaded.max_length, max_length)
        if wants_compile(compile, loaded.device):
            loaded = compile_target(loaded, verify_width(draft), draft.feature_layers if draft else (), cache_dir(), announce)
            if isinstance(loaded, CompiledTarget):
                compile_drafter(draft, loaded.max_length)
        engine = cls(loaded, draft, plan)
        if scheduler == "auto":
            engine.scheduler_for("auto")  # profile now, at start-up, rather than in the first request
        return engine

    def scheduler_for(self, mode: str | None = None, threshold: float | None = None) -> Scheduler:
        """The engine's scheduler, or a copy with another mode or threshold for one request. The auto
        mode needs the SPS profile, measured once (and cached on disk) for any drafter: with a confidence
        head it weighs the confidences, without one (prompt lookup) the acceptance learned online."""
        plan = self.scheduler
        if mode is not None or threshold is not None:
            plan = replace(plan, mode=mode or plan.mode, threshold=plan.threshold if threshold is None else threshold)
        if plan.mode == "auto" and plan.sps is None and self.drafter is not None:
            self.scheduler.sps = plan.sps = sps_profile(self.target, self.drafter.block_size + 1, cache_dir())
        return plan

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation, through the target tokenizer's own chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise LoadError(f"{self.target.name} has no chat template; send a plain prompt instead")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling = Sampling(),
        max_new_tokens: int = 256,
        speculative: bool = True,
        max_draft: int | None = None,
        scheduler: str | None = None,
        threshold: float | None = None,
    ) -> Iterator[Step]:
        """Steps for one request; `speculative=False` runs the same loop with no drafter (the
        baseline). Not thread-safe: one request at a time per engine."""
        drafter = self.drafter if speculative else None
        plan = self.scheduler_for(scheduler, threshold)
        return decode(self.target, drafter, prompt_ids, sampling, max_new_tokens, plan, max_draft)

    def chat(self, messages: list[dict], **options) -> Iterator[Step]:
        return self.generate(self.chat_ids(messages), **options)

    def describe(self) -> str:
        kind = "no drafter"
        if isinstance(self.drafter, DSparkDrafter):
            kind = f"drafter {_block(self.drafter)}, scheduler {self.scheduler.mode}"
        elif isinstance(self.drafter, LookupOrDraft):
            kind = f"prompt lookup, else drafter {_block(self.drafter.drafter)}, scheduler {self.scheduler.mode}"
        elif isinstance(self.drafter, PromptLookupDrafter):
            kind = "prompt lookup"
        compiled = ", compiled" if isinstance(self.target, CompiledTarget) else ""
        return f"{self.target.name} ({self.target.dtype}, {self.target.device}{compiled}), {kind}"


def folder_calibration(folder: Path) -> list[float] | None:
    """The temperatures of the calibration.json beside a drafter, if it has one."""
    path = folder / "calibration.json"
    return load_calibration(path) if path.is_file() else None


def _block(drafter: DSparkDrafter) -> str:
    return f"block {drafter.block_size}" + (" in int8" if drafter.int8 else "") + (", compiled" if drafter.compiled else "")
