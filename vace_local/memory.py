"""Memory policies: where the weights live while a job runs.

- `none`: everything resident on the GPU (fastest).
- `model`: diffusers model CPU offload — one component on the GPU at a time.
- `group`: group offload with CUDA streams — transformer leaf groups prefetched while the previous runs.
- `sequential`: sequential CPU offload — lowest VRAM, slowest.
`auto` picks from free VRAM and the model's footprint. Each policy is a removable diffusers hook.
"""

from __future__ import annotations

from dataclasses import dataclass

from vace_local.spec import OFFLOAD_POLICIES as POLICIES
from vace_local.spec import MemoryPolicy as Policy

GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """Bytes of each component as it will sit on the GPU."""

    transformer: int  # one expert
    text_encoder: int
    vae: int
    experts: int = 1
    #: Helper models sharing the GPU with the pipeline (prompt expander, safety checker).
    aux: int = 0

    @property
    def total(self) -> int:
        return self.transformer * self.experts + self.text_encoder + self.vae + self.aux


def activation_reserve(width: int = 832, height: int = 480, num_frames: int = 81) -> int:
    """Headroom for activations and the VAE decode; grows with the token count (rough, measured-order)."""
    tokens = (num_frames - 1) // 4 + 1
    tokens *= (height // 16) * (width // 16)
    return int(4 * GIB + tokens * 160 * 1024)  # ~9 GiB at 480p×81, ~16 GiB at 720p×81


def choose_policy(free_vram: int | None, fp: Footprint, reserve: int | None = None) -> Policy:
    """Pick the fastest policy that fits. `free_vram=None` means no CUDA: run resident on the CPU."""
    if free_vram is None:
        return "none"
    reserve = activation_reserve() if reserve is None else reserve
    if fp.total + reserve <= free_vram:
        return "none"
    # Model offload needs the largest single component resident (an expert, or the text encoder).
    if max(fp.transformer, fp.text_encoder) + fp.vae + fp.aux + reserve <= free_vram:
        return "model"
    # Group offload keeps only a few leaf groups plus the VAE resident; streams need ~2 groups in flight.
    if fp.vae + fp.aux + reserve + fp.transformer // 10 <= free_vram:
        return "group"
    return "sequential"


def wants_vae_tiling(policy: Policy, free_vram: int | None) -> bool:
    """Tile the VAE whenever memory is tight (anything but fully resident, or < 24 GiB free)."""
    if free_vram is None:
        return False
    return policy != "none" or free_vram < 24 * GIB


def apply_policy(pipe, policy: Policy, device: str) -> None:  # noqa: ANN001 - WanVACEPipeline
    """Install the hooks for `policy` on a pipeline that currently lives on the CPU."""
    import torch

    if policy == "none":
        pipe.to(device)
    elif policy == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif policy == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif policy == "group":
        onload = torch.device(device)
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None:
                model.enable_group_offload(
                    onload_device=onload, offload_device=torch.device("cpu"), offload_type="leaf_level",
                    use_stream=True, low_cpu_mem_usage=True,
                )
        pipe.text_encoder.enable_group_offload(
            onload_device=onload, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=4,
        )
        pipe.vae.to(device)
    else:
        raise ValueError(f"unknown memory policy {policy!r}; choose one of {', '.join(POLICIES)}")
