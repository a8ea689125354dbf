"""Prompt expansion: a small instruction-tuned LM rewrites a short prompt into a detailed video description.

Wan's hosted endpoints offer `enable_prompt_expansion`: the model was trained on long, camera- and motion-aware
captions, so a one-line prompt is rewritten before text encoding. Decoding is greedy, so the same prompt always
gives the same expansion. The LM is loaded on first use and moved off the GPU afterwards (unless kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from vace_local.core.config import DEFAULT_EXPANDER_MODEL, VaceSettings, vace_settings
from vace_local.engine.model_cache import OptionalModelCache
from vace_local.engine.tiny import TINY_HELPER

log = logging.getLogger(__name__)

DOWNLOAD_NAME = "prompt-expander"
NOT_INSTALLED = "prompt expander not installed"

SYSTEM_PROMPT = (
    "You turn a user's short idea for a video clip into one rich paragraph that a text-to-video model can "
    "follow. Keep every subject, action and detail the user gave and never contradict it. Add what a "
    "cinematographer would specify: the main subject's look and clothing, how it moves and what changes over "
    "the few seconds of the clip, the setting and background, lighting and colour, the visual style, and the "
    "camera (shot size, angle, and any pan, tilt, dolly or tracking movement). Describe only what can be seen. "
    "Write in the same language as the user's text. Reply with the paragraph alone, about 80 to 120 words, "
    "with no title, list, quotes or commentary."
)


@dataclass(frozen=True)
class ExpanderOptions:
    """Process-level prompt-expander settings (the server's `VACE_PROMPT_EXPANDER_*`)."""

    model: str = DEFAULT_EXPANDER_MODEL
    max_new_tokens: int = 200
    #: Keep the LM on the GPU between jobs (faster, costs its size in VRAM for the whole process).
    keep_on_gpu: bool = False
    device: str = "cpu"
    allow_download: bool = False

    @classmethod
    def from_env(cls) -> ExpanderOptions:
        return cls.from_settings(vace_settings())

    @classmethod
    def from_settings(cls, s: VaceSettings, device: str = "cpu") -> ExpanderOptions:
        """The registry's `VACE_PROMPT_EXPANDER_*` (the CLI's environment, or the server's settings)."""
        return cls(model=s.prompt_expander_model, max_new_tokens=s.prompt_expander_max_new_tokens,
                   keep_on_gpu=s.prompt_expander_keep_on_gpu, device=device)


@dataclass
class ExpansionReport:
    status: Literal["expanded", "not_installed", "empty", "skipped"]
    model: str
    original_prompt: str
    prompt: str  # the prompt the text encoder sees

    @property
    def message(self) -> str:
        if self.status == "not_installed":
            return (f"{NOT_INSTALLED} ({self.model}): the prompt was used as given; install it with: "
                    f"vace-local download {DOWNLOAD_NAME}")
        if self.status == "skipped":
            return "prompt expansion skipped: the prompt is empty"
        if self.status == "empty":
            return f"prompt expander {self.model} returned nothing: the prompt was used as given"
        if self.tiny:
            return ("prompt rewritten by the TINY smoke-test expander (random-weight stand-in that always answers "
                    "one fixed sentence; not a real expansion)")
        return f"prompt expanded by {self.model} ({len(self.original_prompt)} → {len(self.prompt)} characters)"

    @property
    def tiny(self) -> bool:
        return self.model == TINY_HELPER

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "model": self.model, "tiny": self.tiny, "original_prompt": self.original_prompt,
                "prompt": self.prompt, "message": self.message}


class PromptExpander:
    """A causal LM + its tokenizer (with a chat template), held on the CPU between uses."""

    def __init__(self, options: ExpanderOptions) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vace_local.engine.models import resolve_aux_model

        self.options = options
        path = resolve_aux_model(options.model, DOWNLOAD_NAME, allow_download=options.allow_download)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if options.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self._torch = torch
        log.info("prompt expander %s loaded", options.model)

    def expand(self, prompt: str) -> str:
        torch = self._torch
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        device = self.options.device
        self.model.to(device)
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    do_sample=False, temperature=None, top_p=None, top_k=None,
                    max_new_tokens=self.options.max_new_tokens, repetition_penalty=1.05,
                    pad_token_id=self.tokenizer.eos_token_id if self.tokenizer.pad_token_id is None
                    else self.tokenizer.pad_token_id,
                )
        finally:
            if not self.options.keep_on_gpu and device != "cpu":
                self.model.to("cpu")
                torch.cuda.empty_cache()
        new = out[0, enc["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


_LOADED: OptionalModelCache[ExpanderOptions, PromptExpander] = OptionalModelCache(PromptExpander, NOT_INSTALLED)


def get_expander(options: ExpanderOptions) -> PromptExpander | None:
    """The process's expander for `options` (loaded on first use); None when its weights are not installed."""
    return _LOADED.get(options)


def expand_prompt(prompt: str, options: ExpanderOptions) -> ExpansionReport:
    """Expand `prompt`, or report honestly why the prompt is used as given."""
    if not prompt.strip():  # nothing to keep faithful to: the LM would invent a scene
        return ExpansionReport("skipped", options.model, prompt, prompt)
    expander = get_expander(options)
    if expander is None:
        return ExpansionReport("not_installed", options.model, prompt, prompt)
    expanded = expander.expand(prompt)
    if not expanded:
        return ExpansionReport("empty", options.model, prompt, prompt)
    return ExpansionReport("expanded", options.model, prompt, expanded)
