"""LoRA through the engine: Kijai/ComfyUI and diffusers key layouts, fused weights, distillation overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vace_local.core.bundle import ControlBundle
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions, get_engine
from vace_local.engine.lora import LoraOption, read_lora_file

F, H, W = 17, 32, 48
D, FFN, RANK, ALPHA = 24, 32, 4, 2.0
# Wan original module names → (out, in) of the tiny model's linears.
KIJAI_TARGETS = {
    **{f"self_attn.{n}": (D, D) for n in "qkvo"},
    **{f"cross_attn.{n}": (D, D) for n in "qkvo"},
    "ffn.0": (FFN, D),
    "ffn.2": (D, FFN),
}


def kijai_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA in the Kijai/ComfyUI layout (`diffusion_model.*`, lora_down/lora_up, alpha)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for block in range(3):
        for name, (out_f, in_f) in KIJAI_TARGETS.items():
            key = f"diffusion_model.blocks.{block}.{name}"
            sd[f"{key}.lora_down.weight"] = torch.randn(RANK, in_f, generator=g) * 0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, RANK, generator=g) * 0.5
            sd[f"{key}.alpha"] = torch.tensor(ALPHA)
    return sd


def diffusers_lora(seed: int = 1) -> dict[str, torch.Tensor]:
    """A random LoRA in the diffusers/PEFT layout (`transformer.*`, lora_A/lora_B)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for block in range(3):
        key = f"transformer.blocks.{block}.attn1.to_q"
        sd[f"{key}.lora_A.weight"] = torch.randn(RANK, D, generator=g) * 0.5
        sd[f"{key}.lora_B.weight"] = torch.randn(D, RANK, generator=g) * 0.5
    return sd


def spec(**kw) -> JobSpec:
    base = dict(model="tiny", prompt="a man walks on the street", width=W, height=H, num_frames=F,
                num_inference_steps=3, seed=2)
    base.update(kw)
    return JobSpec(**base)


def bundle() -> ControlBundle:
    rng = np.random.default_rng(2)
    return ControlBundle(frames=rng.random((F, H, W, 3), dtype=np.float32),
                         masks=np.ones((F, H, W), dtype=np.float32))


@pytest.fixture(scope="module")
def base() -> Engine:
    return get_engine("tiny")


@pytest.fixture(scope="module")
def kijai_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "causvid_tiny.safetensors"
    save_file(kijai_lora(), str(path))
    return path


def test_kijai_lora_is_fused_with_the_exact_delta_and_vace_blocks_untouched(base: Engine, kijai_file: Path) -> None:
    scale = 0.7
    eng = Engine("tiny", EngineOptions(loras=(LoraOption(str(kijai_file), scale=scale),)))
    sd = kijai_lora()
    t, t0 = eng.pipe.transformer, base.pipe.transformer
    for block in range(3):
        for orig, module in (("self_attn.q", "attn1.to_q"), ("cross_attn.o", "attn2.to_out.0"), ("ffn.2", "ffn.net.2")):
            key = f"diffusion_model.blocks.{block}.{orig}"
            delta = sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"] * (ALPHA / RANK) * scale
            w = t.get_submodule(f"blocks.{block}.{module}").weight
            w0 = t0.get_submodule(f"blocks.{block}.{module}").weight
            assert torch.allclose(w - w0, delta, atol=1e-5), (block, module)
    for p, p0 in zip(t.vace_blocks.parameters(), t0.vace_blocks.parameters(), strict=True):
        assert torch.equal(p, p0)  # T2V LoRAs touch only the main blocks
    assert not any("lora" in n for n, _ in t.named_modules())  # fused: no adapter layers left at runtime
    assert not np.array_equal(eng.generate(spec(), bundle(), seed=2), base.generate(spec(), bundle(), seed=2))
    assert eng.describe()["fast_path"]["loras"][0]["scale"] == scale


def test_diffusers_format_state_dict_through_add_loras(base: Engine) -> None:
    eng = Engine("tiny", EngineOptions())
    sd = diffusers_lora()
    eng.add_loras([(sd, 1.0)])
    for block in range(3):
        key = f"transformer.blocks.{block}.attn1.to_q"
        delta = sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
        w = eng.pipe.transformer.blocks[block].attn1.to_q.weight
        assert torch.allclose(w - base.pipe.transformer.blocks[block].attn1.to_q.weight, delta, atol=1e-5)
    k = "blocks.0.attn1.to_k.weight"
    assert torch.equal(eng.pipe.transformer.state_dict()[k], base.pipe.transformer.state_dict()[k])


def test_distillation_overrides_set_steps_guidance_and_shift(kijai_file: Path) -> None:
    lora = LoraOption(str(kijai_file), scale=0.5, num_inference_steps=2, guidance_scale=1.0, flow_shift=5.0)
    eng = Engine("tiny", EngineOptions(loras=(lora,)))
    steps: list[int] = []
    frames = eng.generate(spec(num_inference_steps=30, guidance_scale=5.0), bundle(), seed=2,
                          on_progress=lambda p: steps.append(p.step))
    assert frames.shape == (F, H, W, 3)
    assert steps == [1, 2]
    run = eng.last_run
    assert run["num_inference_steps"] == 2 and run["guidance_scale"] == 1.0 and run["flow_shift"] == 5.0
    assert run["forwards"] == 2  # guidance 1: no uncond pass
    assert eng.describe()["fast_path"]["lora_overrides"] == {"num_inference_steps": 2, "guidance_scale": 1.0,
                                                             "flow_shift": 5.0}


def test_two_expert_lora_targets_the_chosen_expert(kijai_file: Path) -> None:
    base = Engine("tiny-two-expert", EngineOptions())
    low = Engine("tiny-two-expert", EngineOptions(loras=(LoraOption(str(kijai_file), experts="low"),)))
    q = "blocks.0.attn1.to_q.weight"
    assert torch.equal(low.pipe.transformer.state_dict()[q], base.pipe.transformer.state_dict()[q])
    assert not torch.equal(low.pipe.transformer_2.state_dict()[q], base.pipe.transformer_2.state_dict()[q])


def test_lora_option_parsing_and_validation(tmp_path: Path) -> None:
    o = LoraOption.parse("/models/causvid.safetensors:0.5:8:1")
    assert (o.source, o.scale, o.num_inference_steps, o.guidance_scale, o.flow_shift) == (
        "/models/causvid.safetensors", 0.5, 8, 1.0, None)
    assert LoraOption.parse("C:/loras/x.safetensors").source == "C:/loras/x.safetensors"
    assert LoraOption.parse("a.safetensors").scale == 1.0
    with pytest.raises(ValueError, match="experts"):
        LoraOption("a.safetensors", experts="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_inference_steps"):
        LoraOption("a.safetensors", num_inference_steps=0)
    with pytest.raises(FileNotFoundError, match="lora file not found"):
        read_lora_file(tmp_path / "missing.safetensors")
    pickle = tmp_path / "x.pt"
    pickle.write_bytes(b"0")
    with pytest.raises(ValueError, match="safetensors"):
        read_lora_file(pickle)
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="exactly one"):
        read_lora_file(tmp_path / "d")


# -- `.alpha` on non-block modules (lightx2v / CausVid releases) and keys diffusers cannot map ---------------
#: Wan original module → diffusers module, for the modules outside the main blocks that such releases train.
NON_BLOCK = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}
BLOCK = {"self_attn.q": "attn1.to_q", "cross_attn.v": "attn2.to_v", "ffn.0": "ffn.net.0.proj"}


def alpha_everywhere_lora(transformer, rank: int = 4, alpha: float = 3.0, seed: int = 5) -> dict[str, torch.Tensor]:
    """A `diffusion_model.*` LoRA (lora_down / lora_up / alpha) on every main block and on the embedders and
    head, sized from `transformer`'s own layers (tiny or real width)."""
    g = torch.Generator().manual_seed(seed)
    targets = {**NON_BLOCK, **{f"blocks.{i}.{o}": f"blocks.{i}.{d}" for i in range(len(transformer.blocks))
                               for o, d in BLOCK.items()}}
    sd: dict[str, torch.Tensor] = {}
    for orig, module in targets.items():
        out_f, in_f = transformer.get_submodule(module).weight.shape
        key = f"diffusion_model.{orig}"
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def expected_deltas(sd: dict[str, torch.Tensor], transformer, scale: float) -> dict[str, torch.Tensor]:
    """module → up @ down · alpha / rank · scale (the LoRA definition, independent of any converter)."""
    out = {}
    for orig, module in {**NON_BLOCK, **{f"blocks.{i}.{o}": f"blocks.{i}.{d}" for i in range(len(transformer.blocks))
                                         for o, d in BLOCK.items()}}.items():
        key = f"diffusion_model.{orig}"
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        out[module] = up @ down * (sd[f"{key}.alpha"].item() / down.shape[0]) * scale
    return out


def test_alpha_keys_on_embedders_and_head_are_applied(base: Engine, tmp_path: Path) -> None:
    """diffusers alone fails on these files ("state_dict should be empty … text_embedding.0.alpha")."""
    sd = alpha_everywhere_lora(base.pipe.transformer)
    path = tmp_path / "lightx2v_style.safetensors"
    save_file(sd, str(path))
    eng = Engine("tiny", EngineOptions(loras=(LoraOption(str(path), scale=0.8),)))
    t, t0 = eng.pipe.transformer, base.pipe.transformer
    for module, delta in expected_deltas(sd, t0, 0.8).items():
        got = t.get_submodule(module).weight.float() - t0.get_submodule(module).weight.float()
        assert torch.allclose(got, delta, atol=1e-5), module


def test_unmappable_lora_keys_fail_naming_the_file_and_the_key(base: Engine, tmp_path: Path) -> None:
    sd = kijai_lora()
    sd["diffusion_model.vace_blocks.0.self_attn.q.lora_down.weight"] = torch.zeros(RANK, D)
    sd["diffusion_model.vace_blocks.0.self_attn.q.lora_up.weight"] = torch.zeros(D, RANK)
    vace = tmp_path / "vace_blocks.safetensors"
    save_file(sd, str(vace))
    with pytest.raises(ValueError, match=r"vace_blocks\.safetensors.*vace_blocks\.0\.self_attn\.q.*VACE blocks"):
        Engine("tiny", EngineOptions(loras=(LoraOption(str(vace)),)))
    orphan = tmp_path / "orphan_alpha.safetensors"
    save_file({**kijai_lora(), "diffusion_model.head.head.alpha": torch.tensor(1.0)}, str(orphan))
    with pytest.raises(ValueError, match=r"orphan_alpha\.safetensors.*'diffusion_model\.head\.head\.alpha'"):
        Engine("tiny", EngineOptions(loras=(LoraOption(str(orphan)),)))


def musubi_lora(transformer, rank: int = 4, alpha: float = 2.0, seed: int = 7) -> dict[str, torch.Tensor]:
    """A musubi-tuner LoRA (`lora_unet_blocks_N_self_attn_q.lora_down.weight`, alpha required): every attention
    projection and both FFN linears of every main block, as that trainer writes them."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(len(transformer.blocks)):
        for orig in [f"self_attn_{o}" for o in "qkvo"] + [f"cross_attn_{o}" for o in "qkvo"] + ["ffn_0", "ffn_2"]:
            module = f"blocks.{i}." + orig.replace("self_attn_", "self_attn.").replace("cross_attn_", "cross_attn.") \
                .replace("ffn_", "ffn.")
            out_f, in_f = transformer.get_submodule(wan_to_diffusers_module(module)).weight.shape
            key = f"lora_unet_blocks_{i}_{orig}"
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def wan_to_diffusers_module(module: str) -> str:
    """`blocks.N.self_attn.q` → `blocks.N.attn1.to_q` (Wan original names → diffusers)."""
    names = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}
    head, _, tail = module.partition(".")
    idx, _, rest = tail.partition(".")
    return f"{head}.{idx}.{names[rest]}"


def test_real_key_layouts_on_the_real_architecture_model(realarch_wan21: Path, tmp_path: Path) -> None:
    """Three files in the layouts releases use — Kijai/ComfyUI `diffusion_model.*` with alphas on the embedders
    and head too, musubi `lora_unet_*`, diffusers/PEFT — fused by the engine into the real-architecture model
    (tests/realarch.py: 1.3B width, loaded from disk like real weights) with the exact summed deltas."""
    from diffusers import WanVACEPipeline

    base_t = WanVACEPipeline.from_pretrained(realarch_wan21).transformer
    kijai, musubi = alpha_everywhere_lora(base_t, rank=8, alpha=4.0), musubi_lora(base_t)
    g = torch.Generator().manual_seed(9)
    peft = {"transformer.blocks.1.attn2.to_k.lora_A.weight": torch.randn(8, 1536, generator=g) / 40,
            "transformer.blocks.1.attn2.to_k.lora_B.weight": torch.randn(1536, 8, generator=g) / 10}
    options = []
    for name, sd, scale in (("kijai", kijai, 0.5), ("musubi", musubi, 0.8), ("peft", peft, 1.0)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        options.append(LoraOption(str(tmp_path / f"{name}.safetensors"), scale=scale))
    eng = Engine(str(realarch_wan21), EngineOptions(offload="none", dtype="fp32", loras=tuple(options)))
    expected: dict[str, torch.Tensor] = expected_deltas(kijai, base_t, 0.5)
    for key in [k for k in musubi if k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        down, up = musubi[key], musubi[f"{stem}.lora_up.weight"]
        i, orig = stem.removeprefix("lora_unet_blocks_").split("_", 1)
        module = wan_to_diffusers_module(f"blocks.{i}." + orig.replace("_attn_", "_attn.").replace("ffn_", "ffn."))
        delta = up @ down * (musubi[f"{stem}.alpha"].item() / down.shape[0]) * 0.8
        expected[module] = expected.get(module, 0) + delta
    expected["blocks.1.attn2.to_k"] = expected["blocks.1.attn2.to_k"] + \
        peft["transformer.blocks.1.attn2.to_k.lora_B.weight"] @ peft["transformer.blocks.1.attn2.to_k.lora_A.weight"]
    t = eng.pipe.transformer
    assert not any("lora" in n for n, _ in t.named_modules())
    for module, delta in expected.items():
        got = t.get_submodule(module).weight - base_t.get_submodule(module).weight
        assert torch.allclose(got, delta, atol=3e-5, rtol=1e-4), module
    for untouched in ("vace_blocks.0.attn1.to_q.weight", "vace_blocks.0.proj_out.weight"):  # `proj_out` = head too
        assert torch.equal(t.state_dict()[untouched], base_t.state_dict()[untouched]), untouched
