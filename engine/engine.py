"""The Python API: load a target and a drafter, then stream Step events for prompts or chats."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from .catalog import shipped_drafter
from .compiled import CompiledTarget, compile_drafter, compile_target, verify_width, wants_compile
from .decode import Drafter, Step, decode
from .dspark import DSparkDrafter
from .eagle3 import Eagle3Drafter
from .loading import LoadError, cache_dir, load_drafter, load_target, model_dir
from .prompt_lookup import LookupOrDraft, PromptLookupDrafter
from .sampling import Sampling
from .scheduler import Profile, Scheduler, cached_profile, load_calibration, measure_profile
from .target import Target


class Engine:
    def __init__(self, target: Target, drafter: Drafter | None = None, scheduler: Scheduler | None = None,
                 wait_for_profile: bool = True):
        self.target = target
        self.drafter = drafter
        self.scheduler = scheduler or Scheduler(mode="off")
        # The server never waits for the SPS profile: it decodes with the cached one, or verifies every draft
        # until its worker has measured one between requests (measure_profile).
        self.wait_for_profile = wait_for_profile
        self.profile: Profile | None = None
        self.profile_measured = False  # in this process

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
        wait_for_profile: bool = True,
        phase: Callable[[str], None] = lambda name: None,
        compile: str = "off",
        max_length: int | None = None,
    ) -> "Engine":
        """A drafter with prompt lookup copies where the context repeats itself and drafts with the model
        elsewhere (LookupOrDraft). With neither asked for, a target with a shipped drafter gets it with
        prompt lookup, the fastest way on code and maths and close to prompt lookup alone on chat
        (README, "Benchmark"; `default_drafter=False` loads no drafter: plain decoding). On an x86
        CPU the drafter runs in int8 unless `float_drafter` (load_drafter). `phase(name)` is called as each
        part of loading begins (the server shows them with their times), compiling among them. `compile` is on,
        off or auto (compiled.wants_compile). `max_length` caps the context, which the compiled target's cache
        is made for."""
        if not drafter and not prompt_lookup and default_drafter:
            drafter = shipped_drafter(target)
            prompt_lookup = drafter is not None
        loaded = load_target(target, dtype, device, placement, phase)
        if (drafter or prompt_lookup) and loaded.speculation_refusal:
            raise LoadError(loaded.speculation_refusal)
        draft: Drafter | None = PromptLookupDrafter() if prompt_lookup else None
        plan = Scheduler(mode=scheduler, threshold=threshold)
        if drafter:
            folder = model_dir(drafter)
            phase("loading the drafter" + ("" if float_drafter else " (int8 on an x86 CPU)"))
            draft = load_drafter(str(folder), loaded, int8=not float_drafter)
            if prompt_lookup:
                draft = LookupOrDraft(draft)
            plan.temperatures = load_calibration(Path(calibration)) if calibration else folder_calibration(folder)
        if max_length:
            loaded.max_length = min(loaded.max_length, max_length)
        if wants_compile(compile, loaded.device):
            loaded = compile_target(loaded, verify_width(draft), draft.feature_layers if draft else (), cache_dir(),
                                    lambda line: phase(f"compiling ({line})"))
            if isinstance(loaded, CompiledTarget):
                compile_drafter(draft, loaded.max_length)
        engine = cls(loaded, draft, plan, wait_for_profile)
        if scheduler == "auto":
            engine.scheduler_for("auto")  # the profile now, at start-up, rather than in the first request
        return engine

    def scheduler_for(self, mode: str | None = None, threshold: float | None = None) -> Scheduler:
        """The engine's scheduler, or a copy with another mode or threshold for one request. The auto
        mode needs the SPS profile, measured once (and cached on disk) for any drafter: with a confidence
        head it weighs the confidences, without one (prompt lookup) the acceptance learned online."""
        plan = self.scheduler
        if mode is not None or threshold is not None:
            plan = replace(plan, mode=mode or plan.mode, threshold=plan.threshold if threshold is None else threshold)
        # A scheduler given its profile (a test's fixed one, bench's) keeps it: a cached one must not replace it.
        if plan.mode == "auto" and self.profile is None and self.drafter is not None and not plan.sps:
            tokens = self.drafter.block_size + 1
            self.profile = cached_profile(self.target, tokens, cache_dir())
            if self.profile is None and self.wait_for_profile:
                self.profile = measure_profile(self.target, tokens, cache_dir())
                self.profile_measured = True
            if self.profile is not None:
                self.scheduler.sps = plan.sps = self.profile.sps
        return plan

    @property
    def profile_wanted(self) -> bool:
        """Whether the auto scheduler still lacks a sound SPS profile that this process could measure."""
        return (self.scheduler.mode == "auto" and self.drafter is not None and not self.profile_measured
                and (self.profile is None or self.profile.noisy))

    def measure_profile(self, interrupted: Callable[[], bool]) -> None:
        """Measure the SPS profile now (once per process; a noisy one is measured again by the next process).
        Raises Interrupted, keeping the profile it had, as soon as `interrupted()` says so."""
        self.profile = measure_profile(self.target, self.drafter.block_size + 1, cache_dir(), interrupted=interrupted)
        self.profile_measured = True
        self.scheduler.sps = self.profile.sps

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
        if isinstance(self.drafter, (DSparkDrafter, Eagle3Drafter)):
            kind = f"{_block(self.drafter)}, scheduler {self.scheduler.mode}"
        elif isinstance(self.drafter, LookupOrDraft):
            kind = f"prompt lookup, else {_block(self.drafter.drafter)}, scheduler {self.scheduler.mode}"
        elif isinstance(self.drafter, PromptLookupDrafter):
            kind = "prompt lookup"
        compiled = ", compiled" if isinstance(self.target, CompiledTarget) else ""
        return f"{self.target.name} ({self.target.dtype}, {self.target.device}{compiled}), {kind}"


def folder_calibration(folder: Path) -> list[float] | None:
    """The temperatures of the calibration.json beside a drafter, if it has one."""
    path = folder / "calibration.json"
    return load_calibration(path) if path.is_file() else None


def _block(drafter: DSparkDrafter | Eagle3Drafter) -> str:
    chain = isinstance(drafter, Eagle3Drafter)
    return (("Eagle3 drafter, chain" if chain else "drafter block") + f" {drafter.block_size}" + (" in int8" if drafter.int8 else "")
            + (", compiled" if drafter.compiled else ""))
