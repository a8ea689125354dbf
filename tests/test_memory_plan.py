"""The load-time memory plan (`auto` dtype and offload) on the real model sizes, and how it explains itself.

Parameter counts come from the published configs (vace_bench.synthetic: Wan2.1-VACE-14B / 1.3B transformer,
UMT5-XXL encoder, Wan VAE) instantiated on the meta device — never typed in. Wan2.2-VACE-Fun-A14B has two
experts with the 14B config. Card sizes are what CUDA reports free after its context (≈ 1 GiB less than the
card); host RAM is what the OS reports available on an otherwise idle box (≈ 2 GiB less than installed).
"""

from __future__ import annotations

import pytest

from vace_bench.synthetic import TRANSFORMER_CONFIGS, VAE_CONFIGS, text_encoder_config
from vace_local.core.errors import InsufficientMemory
from vace_local.engine.memory import GIB, HOST_RESERVE, ModelSize, activation_reserve, plan_memory
from vace_local.engine.models import component_size, meta_component

CARDS_GB = (12, 16, 24, 48, 80, 141)
HOSTS_GB = (32, 64)


@pytest.fixture(scope="module")
def sizes() -> dict[str, ModelSize]:
    from diffusers import AutoencoderKLWan, WanVACETransformer3DModel
    from transformers import UMT5EncoderModel

    te = component_size(meta_component(UMT5EncoderModel, text_encoder_config("xxl")))
    vae = component_size(meta_component(AutoencoderKLWan, VAE_CONFIGS["wan"]))
    t13 = component_size(meta_component(WanVACETransformer3DModel, TRANSFORMER_CONFIGS["1.3b"]))
    t14 = component_size(meta_component(WanVACETransformer3DModel, TRANSFORMER_CONFIGS["14b"]))
    return {"1.3b": ModelSize(t13, te, vae), "14b": ModelSize(t14, te, vae), "a14b": ModelSize(t14, te, vae, 2)}


def test_meta_counts_match_the_published_sizes(sizes: dict[str, ModelSize]) -> None:
    """The meta-device counts agree with the published checkpoints (diffusers-wan-notes §8)."""
    assert sizes["14b"].transformer.params == pytest.approx(17.34e9, rel=0.005)
    assert sizes["1.3b"].transformer.params == pytest.approx(2.15e9, rel=0.005)
    assert sizes["14b"].text_encoder.params == pytest.approx(5.68e9, rel=0.005)  # UMT5-XXL, tied embedding once
    assert sizes["14b"].vae.params == pytest.approx(127e6, rel=0.01)
    fp = sizes["a14b"].footprint("bf16")
    assert fp.transformer / GIB == pytest.approx(32.3, abs=0.1) and fp.experts == 2
    assert fp.text_encoder / GIB == pytest.approx(10.6, abs=0.1)
    assert fp.vae == 4 * sizes["a14b"].vae.params  # the VAE stays fp32
    # fp8 storage stores the block linears at one byte: about half the bf16 transformer
    fp8 = sizes["14b"].footprint("bf16", fp8_storage=True).transformer
    assert fp8 / sizes["14b"].footprint("bf16").transformer == pytest.approx(0.5, abs=0.02)


# (model, card GB or None for CPU) -> expected (dtype, policy) per host RAM 32 / 64 GB; "error" = nothing fits.
# 1.3B bf16: 4.0 + 10.6 + 0.5 = 15.1 GiB; 14B: 32.3 + 10.6 + 0.5 = 43.4 GiB; A14B: 75.7 GiB; activation reserve
# at 480p x 81 = 9.0 GiB. Offload policies keep one host copy of the weights (+ 1 GiB reserve).
EXPECTED: dict[tuple[str, int | None], tuple[str, str]] = {
    ("1.3b", 12): ("group", "group"),  # model offload needs 10.6 + 0.5 + 9.0 = 20.1 GiB
    ("1.3b", 16): ("group", "group"),
    ("1.3b", 24): ("model", "model"),
    ("1.3b", 48): ("none", "none"),
    ("1.3b", 80): ("none", "none"),
    ("1.3b", 141): ("none", "none"),
    ("1.3b", None): ("bf16", "fp32"),  # fp32 = 29.7 GiB + 1 does not fit 30 GiB free; fits 62
    ("14b", 12): ("error", "sequential"),  # a 44.4 GiB host copy does not fit 30 GiB free RAM
    ("14b", 16): ("error", "group"),
    ("14b", 24): ("error", "group"),
    ("14b", 48): ("error", "model"),
    ("14b", 80): ("none", "none"),  # resident: loaded straight to the GPU, no host copy
    ("14b", 141): ("none", "none"),
    ("14b", None): ("error", "bf16"),
    ("a14b", 12): ("error", "error"),  # 76.7 GiB host copy > 62 GiB
    ("a14b", 16): ("error", "error"),
    ("a14b", 24): ("error", "error"),
    ("a14b", 48): ("error", "error"),
    ("a14b", 80): ("error", "error"),  # resident needs 84.7 GiB of VRAM
    ("a14b", 141): ("none", "none"),
    ("a14b", None): ("error", "error"),
}


@pytest.mark.parametrize("host_gb", HOSTS_GB)
@pytest.mark.parametrize(("model", "card_gb"), list(EXPECTED))
def test_auto_plan_per_card_and_host(sizes: dict[str, ModelSize], model: str, card_gb: int | None,
                                     host_gb: int) -> None:
    expected = EXPECTED[(model, card_gb)][HOSTS_GB.index(host_gb)]
    free_ram = (host_gb - 2) * GIB
    free_vram = None if card_gb is None else (card_gb - 1) * GIB
    device = "cpu" if card_gb is None else "cuda"
    if expected == "error":
        with pytest.raises(InsufficientMemory) as err:
            plan_memory(sizes[model], device=device, free_vram=free_vram, free_ram=free_ram)
        msg = str(err.value)
        bf16_total = sizes[model].footprint("bf16").total
        assert f"weights {bf16_total / GIB:.1f} GiB" in msg and f"free RAM {host_gb - 2:.1f} GiB" in msg
        assert f"free VRAM {card_gb - 1:.1f} GiB" in msg if card_gb else "no CUDA device" in msg
        return
    plan = plan_memory(sizes[model], device=device, free_vram=free_vram, free_ram=free_ram)
    if card_gb is None:
        assert (plan.dtype, plan.policy) == (expected, "none")
    else:
        assert (plan.dtype, plan.policy) == ("bf16", expected)
        assert plan.vram_need is not None and (plan.vram_need <= free_vram or plan.policy == "sequential")
    assert plan.ram_need <= free_ram and plan.fits
    # it explains itself: the choice and the numbers it came from
    assert f"offload={plan.policy}" in plan.reason and f"free RAM {host_gb - 2:.1f} GiB" in plan.reason
    assert f"{plan.dtype} weights {plan.footprint.total / GIB:.1f} GiB" in plan.reason
    d = plan.as_dict()
    assert d["free_ram_bytes"] == free_ram and d["free_vram_bytes"] == free_vram and d["params"] == sizes[model].params


def test_fp8_storage_makes_the_big_models_fit(sizes: dict[str, ModelSize]) -> None:
    """The error's advice holds: fp8 storage halves the experts, so A14B is resident on an 80 GB card and 14B
    offloads on a 24 GB card with 32 GB of host RAM."""
    a14b = plan_memory(sizes["a14b"], device="cuda", free_vram=79 * GIB, free_ram=62 * GIB, fp8_storage=True)
    assert a14b.policy == "none"
    b14 = plan_memory(sizes["14b"], device="cuda", free_vram=23 * GIB, free_ram=30 * GIB, fp8_storage=True)
    assert b14.policy == "group" and b14.ram_need <= 30 * GIB


def test_explicit_choices_are_kept_and_flagged(sizes: dict[str, ModelSize]) -> None:
    """An explicit dtype / offload is the user's call: kept, with `fits=False` and the numbers, not an error."""
    plan = plan_memory(sizes["14b"], device="cpu", free_vram=None, free_ram=30 * GIB, dtype="fp32")
    assert plan.dtype == "fp32" and not plan.fits and "fp32 as set" in plan.reason
    plan = plan_memory(sizes["14b"], device="cuda", free_vram=23 * GIB, free_ram=62 * GIB, offload="none")
    assert plan.policy == "none" and not plan.fits and "does not fit" in plan.reason
    plan = plan_memory(sizes["1.3b"], device="cpu", free_vram=None, free_ram=62 * GIB, offload="group")
    assert plan.policy == "group" and plan.fits


def test_reserves_are_what_the_plan_counts(sizes: dict[str, ModelSize]) -> None:
    """Resident on CUDA needs weights + activation reserve of VRAM and only the process's reserve of RAM."""
    s = sizes["1.3b"]
    plan = plan_memory(s, device="cuda", free_vram=47 * GIB, free_ram=4 * GIB)
    assert plan.policy == "none"
    assert plan.vram_need == s.footprint("bf16").total + activation_reserve() and plan.ram_need == HOST_RESERVE
