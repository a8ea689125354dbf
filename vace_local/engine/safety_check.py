"""Safety checker: a transformers image classifier run on sampled output frames (and, optionally, input images).

The hosted APIs accept `enable_safety_checker`; this module answers it with a real classifier, or says plainly
that none is installed, so a response never claims "checked, clean" when nothing was looked at. Which label
means "flagged" comes from the model's `id2label` (or is configured), never from a hard-coded index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vace_local.core.config import DEFAULT_SAFETY_MODEL, VaceSettings, vace_settings
from vace_local.core.errors import VaceError
from vace_local.engine.model_cache import OptionalModelCache
from vace_local.engine.tiny import TINY_HELPER

log = logging.getLogger(__name__)

#: `vace-local download safety` fetches this model; the same name appears in "not installed" errors.
DOWNLOAD_NAME = "safety"
NOT_INSTALLED = "safety checker not installed"
#: Label names (lower case) taken to mean "flagged" when no labels are configured.
FLAGGED_LABEL_NAMES = frozenset({"nsfw", "porn", "hentai", "sexy", "explicit", "unsafe", "nude", "nudity"})
SafetyPolicy = Literal["report", "replace"]


@dataclass(frozen=True)
class SafetyOptions:
    """Process-level safety-checker settings (the server's `VACE_SAFETY_*`)."""

    model: str = DEFAULT_SAFETY_MODEL
    #: report: flag only; replace: a flagged output is replaced by a black video of the same size and length.
    policy: SafetyPolicy = "report"
    #: Also classify the job's input images (reference / first / last); a flagged input flags the output.
    check_inputs: bool = False
    #: Labels that mean flagged; empty: every label whose name is in FLAGGED_LABEL_NAMES.
    flagged_labels: tuple[str, ...] = ()
    #: Flagged when the summed probability of the flagged labels reaches this on any checked image.
    threshold: float = 0.5
    #: Output frames sampled evenly (first and last included).
    frames: int = 8
    device: str = "cpu"
    allow_download: bool = False

    @classmethod
    def from_env(cls) -> SafetyOptions:
        return cls.from_settings(vace_settings())

    @classmethod
    def from_settings(cls, s: VaceSettings, device: str = "cpu") -> SafetyOptions:
        """The registry's `VACE_SAFETY_*` (the CLI's environment, or the server's settings)."""
        return cls(model=s.safety_model, policy=s.safety_policy, check_inputs=s.safety_check_inputs,
                   flagged_labels=tuple(s.safety_flagged_labels), threshold=s.safety_threshold,
                   frames=s.safety_frames, device=device)


@dataclass
class SafetyReport:
    """What the check found; `flagged` is None when nothing was checked."""

    status: Literal["checked", "not_installed"]
    model: str
    flagged: bool | None = None
    max_score: float | None = None
    frames_checked: int = 0
    inputs: list[dict[str, Any]] = field(default_factory=list)
    action: Literal["none", "replaced_with_black"] = "none"
    policy: SafetyPolicy = "report"

    @property
    def message(self) -> str:
        if self.status == "not_installed":
            return (f"{NOT_INSTALLED} ({self.model}): nothing was checked, has_nsfw_contents is null; "
                    f"install it with: vace-local download {DOWNLOAD_NAME}")
        verdict = "flagged" if self.flagged else "not flagged"
        extra = "; replaced with a black video (policy replace)" if self.action == "replaced_with_black" else ""
        inputs = f", {len(self.inputs)} input image(s)" if self.inputs else ""
        name = ("(TINY smoke-test classifier: flags only images about half pure magenta #FF00FF; not a real "
                "safety check)" if self.tiny else self.model)
        return (f"safety checker {name}: output {verdict} (max score {self.max_score:.3f} over "
                f"{self.frames_checked} frames{inputs}){extra}")

    @property
    def tiny(self) -> bool:
        return self.model == TINY_HELPER

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "model": self.model, "tiny": self.tiny, "flagged": self.flagged,
                "max_score": self.max_score,
                "frames_checked": self.frames_checked, "inputs": self.inputs, "policy": self.policy,
                "action": self.action, "message": self.message}


def flagged_label_ids(id2label: dict[int, str], wanted: tuple[str, ...]) -> list[int]:
    """Indices of the labels that mean flagged; raises when the model's labels cannot tell."""
    names = {int(i): str(n) for i, n in id2label.items()}
    if wanted:
        ids = [i for i, n in names.items() if n in wanted]
        missing = sorted(set(wanted) - set(names.values()))
        if missing:
            raise VaceError(f"safety checker: labels {missing} are not in the model's labels {sorted(names.values())}")
        return ids
    ids = [i for i, n in names.items() if n.lower() in FLAGGED_LABEL_NAMES]
    if not ids:
        raise VaceError(f"safety checker: none of the model's labels {sorted(names.values())} is a known flagged "
                        "label; set VACE_SAFETY_FLAGGED_LABELS")
    return ids


def sample_indices(n: int, k: int) -> list[int]:
    """k frame indices spread evenly over n frames, first and last included."""
    if n <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, num=max(1, min(k, n)))})


class SafetyChecker:
    """An image classifier loaded once per process; `scores` gives each image's flagged probability."""

    def __init__(self, options: SafetyOptions) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from vace_local.engine.models import resolve_aux_model

        self.options = options
        path = resolve_aux_model(options.model, DOWNLOAD_NAME, allow_download=options.allow_download)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForImageClassification.from_pretrained(path).eval().to(options.device)
        self.flagged_ids = flagged_label_ids(self.model.config.id2label, options.flagged_labels)
        self._torch = torch
        log.info("safety checker %s loaded (flagged labels %s)", options.model,
                 [self.model.config.id2label[i] for i in self.flagged_ids])

    def scores(self, images: list[np.ndarray], batch: int = 8) -> list[float]:
        torch = self._torch
        out: list[float] = []
        for start in range(0, len(images), batch):
            chunk = [np.asarray(x, dtype=np.uint8) for x in images[start:start + batch]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.options.device)
            with torch.no_grad():
                probs = self.model(pixel_values=pixels).logits.float().softmax(-1)
            out.extend(probs[:, self.flagged_ids].sum(-1).tolist())
        return out


_LOADED: OptionalModelCache[SafetyOptions, SafetyChecker] = OptionalModelCache(SafetyChecker, NOT_INSTALLED)


def get_checker(options: SafetyOptions) -> SafetyChecker | None:
    """The process's checker for `options` (loaded on first use); None when its weights are not installed."""
    return _LOADED.get(options)


def check_output(frames: np.ndarray, input_images: list[tuple[str, Path]], options: SafetyOptions) -> SafetyReport:
    """Classify sampled output frames (and input images if configured); apply nothing — see `apply_policy`."""
    checker = get_checker(options)
    if checker is None:
        return SafetyReport("not_installed", options.model, policy=options.policy)
    idx = sample_indices(len(frames), options.frames)
    scores = checker.scores([frames[i] for i in idx])
    report = SafetyReport("checked", options.model, frames_checked=len(idx), policy=options.policy)
    worst = max(scores, default=0.0)
    if options.check_inputs and input_images:
        from vace_local.core.media import load_image

        images = [np.array(load_image(p, name)) for name, p in input_images]
        for (name, _p), s in zip(input_images, checker.scores(images), strict=True):
            report.inputs.append({"field": name, "score": round(s, 4), "flagged": s >= options.threshold})
            worst = max(worst, s)
    report.max_score = round(float(worst), 4)
    report.flagged = bool(worst >= options.threshold)
    return report


def apply_policy(frames: np.ndarray, report: SafetyReport) -> np.ndarray:
    """Under the replace policy a flagged output becomes black frames of the same shape (then encoded as usual)."""
    if report.flagged and report.policy == "replace":
        report.action = "replaced_with_black"
        return np.zeros_like(frames)
    return frames
