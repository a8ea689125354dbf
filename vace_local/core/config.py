"""The settings registry: every `VACE_*` environment variable, declared once with its type, default and meaning.

`VaceSettings` holds what the CLI, the engine, the preprocessors and the media checks read; `EngineSettings` the
engine options a user picks (the `vace-local generate` / `serve` flags are made from its fields by
`engine_flags`). The server's `Settings` (server/settings.py) extends both with the API's and the workers' own
variables, so every variable has exactly one declaration. Code reads `vace_settings()` (the environment as it is
now) and never `os.environ`; tests/test_settings_registry.py fails on a `VACE_*` read anywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "VACE_"
#: The model `generate` and `serve` use when none is named.
DEFAULT_MODEL = "wan2.1-vace-14b"
#: The image classifier behind `enable_safety_checker` (`vace-local download safety`).
DEFAULT_SAFETY_MODEL = "Falconsai/nsfw_image_detection"
#: The instruction LM behind `enable_prompt_expansion` (`vace-local download prompt-expander`).
DEFAULT_EXPANDER_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
#: The longest job accepted by default (60 s at 16 fps); `VACE_MAX_FRAMES` changes it (core.spec bounds it).
DEFAULT_MAX_JOB_FRAMES = 961

# -- engine options (process-level): the words EngineOptions, the server settings and both CLIs accept --
#: Where the weights live while a job runs (vace_local.engine.memory); `auto` picks one from free VRAM.
MemoryPolicy = Literal["none", "model", "group", "sequential"]
OffloadPolicy = Literal["auto", MemoryPolicy]
#: Compute dtype of the transformer and text encoder; `auto` = bf16 on CUDA, fp32 on CPU (the VAE stays fp32).
DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
#: fp8 weights: `storage` keeps e4m3 weights and computes in bf16, `linear` runs torchao float8 linears.
Fp8Mode = Literal["none", "storage", "linear"]
OFFLOAD_POLICIES: tuple[str, ...] = get_args(OffloadPolicy)
DTYPES: tuple[str, ...] = get_args(DtypeName)
FP8_MODES: tuple[str, ...] = get_args(Fp8Mode)


def env_name(field: str) -> str:
    """The environment variable of a registry field (`media_max_side` → `VACE_MEDIA_MAX_SIDE`)."""
    return ENV_PREFIX + field.upper()


def user_cache() -> Path:
    """The per-user cache folder the defaults below live in."""
    return Path.home() / ".cache" / "vace-local"


def split_list(v: Any) -> Any:
    """Env lists are comma-separated (`VACE_API_KEYS=a,b`); JSON lists are accepted too."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            import json

            return json.loads(s)
        return [p.strip() for p in s.split(",") if p.strip()]
    return v


def _flag(*decls: str) -> dict[str, Any]:
    """Marks a field as a command-line option of `generate` and `serve` (see `engine_flags`)."""
    return {"flag": list(decls)}


class EngineSettings(BaseModel):
    """The engine options a user picks; `EngineOptions.from_settings` adds the process's own (device, ...)."""

    offload: OffloadPolicy = Field("auto", description=f"Memory policy: {' | '.join(OFFLOAD_POLICIES)}.",
                                   json_schema_extra=_flag("--offload"))
    dtype: DtypeName = Field("auto", description=f"{' | '.join(DTYPES)} (auto: bf16 on CUDA).",
                             json_schema_extra=_flag("--dtype"))
    attention: str = Field("auto", description="Attention backend: auto | fa3 | cudnn | fa2 | sdpa | a diffusers "
                                               "name.", json_schema_extra=_flag("--attention"))
    cfg_batch: bool = Field(False, description="Run CFG's two branches as one batched forward.",
                            json_schema_extra=_flag("--cfg-batch/--no-cfg-batch"))
    compile: bool = Field(False, description="torch.compile the repeated blocks.",
                          json_schema_extra=_flag("--compile/--no-compile"))
    fp8: Fp8Mode = Field("none", description="none | storage (fp8 weights, bf16 compute) | linear (torchao float8).",
                         json_schema_extra=_flag("--fp8"))
    loras: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="PATH[:scale[:steps[:guidance[:shift]]]]: a LoRA fused at load "
        "(repeatable; comma-separated in the environment).", json_schema_extra=_flag("--lora"))
    #: Per-request LoRAs (`JobSpec.loras`) kept loaded as adapters per process, least recently used dropped first.
    lora_adapters: int = Field(4, ge=1, le=64)
    #: With `compile`: the rank of the fixed LoRA slot per-request LoRAs are written into (no recompile per swap; its
    #: matmuls run on every job); 0 turns it off and refuses per-request LoRAs on a compiled engine.
    lora_slot_rank: int = Field(64, ge=0, le=1024)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras(cls, v: Any) -> Any:  # a distinct name: a subclass's validator of the same name replaces it
        return split_list(v)


class VaceSettings(BaseSettings):
    """What the CLI, the engine, the preprocessors and the media checks read from `VACE_*` variables.

    An empty variable counts as unset. Read it with `vace_settings()`; the server's `Settings` extends it."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    # -- where things live --
    #: Where the tiny models, downloaded LoRA files and other local caches are built (default ~/.cache/vace-local;
    #: a server's workers default to <data dir>/cache).
    cache_dir: Path | None = None
    #: Annotator checkpoints (ali-vilab/VACE-Annotators layout); default ~/.cache/vace-local/annotators.
    annotators_dir: Path | None = None
    #: A RIFE network exported to ONNX for fal's `interpolator_model: rife`; default ~/.cache/vace-local/rife.onnx.
    rife_onnx: Path | None = None
    #: The base (built-in name or diffusers directory) of a local original-format checkpoint; default: the
    #: official diffusers model of the checkpoint's width.
    base_model: str | None = None
    #: The folder a per-request `loras[].path` file name is looked up in.
    lora_dir: Path | None = None
    # -- the job --
    #: Longest job in frames (4k+1; default 961 = 60 s at 16 fps). Past `window_frames` a job is made of
    #: overlapping windows (core/windows.py); the hosted dialects keep their own limits unless a request sends
    #: `long_video: true`. The CLI clamps it to 17..9601 (core.spec.max_job_frames); the server refuses values
    #: outside and exports its own to the API process and the workers (JobSpec reads it).
    max_frames: int = DEFAULT_MAX_JOB_FRAMES
    # -- what an input may declare before it is decoded, and what its decoding child may use (core.media_limits) --
    media_max_side: int = Field(8192, gt=0)  # pixels per side, videos and images
    media_max_frames: int = Field(2000, gt=0)
    media_max_seconds: float = Field(120.0, gt=0)
    media_max_image_pixels: int = Field(8192 * 8192, gt=0)  # width x height of a still image
    #: width x height x frames, what decoding every frame costs (about 1000 frames of 4K); bounds GIFs whose canvas
    #: and frame count are each just allowed.
    media_max_decoded_pixels: int = Field(1 << 33, gt=0)
    media_memory_mb: int = Field(4096, gt=0)  # address-space cap of the decoding child
    media_timeout_s: float = Field(120.0, gt=0)  # wall-clock cap of the decoding child
    # -- safety checker and prompt expander (run when a job asks; see README) --
    #: Image classifier for `enable_safety_checker`: Hub repo id (`vace-local download safety`) or local dir.
    safety_model: str = DEFAULT_SAFETY_MODEL
    #: report: only flag (has_nsfw_contents); replace: a flagged output becomes a black video of the same shape.
    safety_policy: Literal["report", "replace"] = "report"
    #: Also classify input images (reference / first / last); a flagged input flags the output.
    safety_check_inputs: bool = False
    #: Labels of the classifier that mean flagged (comma-separated); empty: derived from the model's id2label.
    safety_flagged_labels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Flagged when the summed probability of the flagged labels reaches this on any checked image.
    safety_threshold: float = Field(0.5, gt=0.0, le=1.0)
    #: Output frames sampled (evenly, first and last included) per job.
    safety_frames: int = Field(8, ge=1, le=256)
    #: Instruction LM for `enable_prompt_expansion`: Hub repo id (`vace-local download prompt-expander`) or dir.
    prompt_expander_model: str = DEFAULT_EXPANDER_MODEL
    prompt_expander_max_new_tokens: int = Field(200, ge=16, le=1024)
    #: Keep the expander on the GPU between jobs (default: moved to the CPU after each use).
    prompt_expander_keep_on_gpu: bool = False
    # -- the GPU kit (scripts/device_check.sh, bench, soak) --
    #: Fail at once instead of skipping or falling back to the CPU when CUDA is missing (tests, bench, soak).
    require_cuda: bool = False
    #: The API key scripts/bench_api.py sends (its `--api-key` default).
    bench_key: str = ""

    @field_validator("safety_flagged_labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return split_list(v)

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or user_cache()

    @property
    def annotators_root(self) -> Path:
        return self.annotators_dir.expanduser() if self.annotators_dir else user_cache() / "annotators"

    @property
    def rife_path(self) -> Path:
        return self.rife_onnx or user_cache() / "rife.onnx"


def settings_error_text(exc: ValidationError) -> str:
    """A registry validation error naming each setting and its variable
    (`media_max_side (VACE_MEDIA_MAX_SIDE): Input should be greater than 0 (got '-1')`)."""
    def name(loc: tuple) -> str:
        return f"{loc[0]} ({env_name(str(loc[0]))})" if loc else "settings"

    return "; ".join(f"{name(e['loc'])}: {e['msg']} (got {e['input']!r})" for e in exc.errors())


@lru_cache(maxsize=8)
def _parse(env: tuple[tuple[str, str], ...]) -> VaceSettings:  # noqa: ARG001 - `env` is the cache key
    try:
        return VaceSettings()
    except ValidationError as exc:
        raise ValueError(settings_error_text(exc)) from None


def vace_settings() -> VaceSettings:
    """The registry as the environment is now: parsed again only when a `VACE_*` variable changed, so the
    server's exports and a test's monkeypatch are seen at once. A bad value raises ValueError naming it."""
    return _parse(tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX))))


def export(**values: Any) -> None:
    """Set registry variables for this process and the processes it starts (the server exports its job maximum
    and its workers' cache folder, which the engine and the media checks read through `vace_settings()`)."""
    for name, value in values.items():
        if name not in VaceSettings.model_fields:
            raise KeyError(f"{name} is not a VaceSettings field")
        os.environ[env_name(name)] = str(value)


F = TypeVar("F", bound=Callable[..., Any])


def engine_flags(*, env_help: bool) -> Callable[[F], F]:
    """Give a typer command one option per `EngineSettings` field marked with a flag, in place of its `engine`
    parameter; the command receives the options the user gave as `engine: dict` (absent ones left to the model's
    default, or the server's environment). `env_help` names each option's `VACE_*` variable in its help."""
    import functools
    import inspect

    import typer

    def option(name: str, info: Any) -> inspect.Parameter:
        decls = info.json_schema_extra["flag"]
        default = info.get_default(call_default_factory=True)
        shown = ", ".join(default) if isinstance(default, list) else str(default).lower()
        help_ = f"{info.description} (default {shown or 'none'}" + (f"; {env_name(name)})" if env_help else ")")
        # typer takes plain types; a Literal is taken as text and checked by the model (naming the choices)
        kind = info.annotation if info.annotation in (bool, int, float, list[str]) else str
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                 annotation=Annotated[kind | None, typer.Option(*decls, help=help_)])

    flags = [option(n, f) for n, f in EngineSettings.model_fields.items()
             if isinstance(f.json_schema_extra, dict) and "flag" in f.json_schema_extra]

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        params = list(sig.parameters.values())
        at = [p.name for p in params].index("engine")
        params[at:at + 1] = flags

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            given = {p.name: kwargs.pop(p.name) for p in flags}
            return func(**kwargs, engine={k: v for k, v in given.items() if v is not None and v != []})

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate
