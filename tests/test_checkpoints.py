"""Original-format Wan VACE checkpoints (the official release layout) converted at load (vace_local.engine.checkpoints).

The checkpoints are written here with the ORIGINAL Wan key names (`blocks.N.self_attn.q`, `norm3`, `modulation`,
`vace_blocks.N.before_proj`, `head.head`, …), mapped by hand from the diffusers modules below — independently
of diffusers' converter, which is what the loader uses and what these tests check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vace_local.core.bundle import ControlBundle
from vace_local.core.errors import ModelNotFoundError
from vace_local.core.spec import JobSpec
from vace_local.engine.checkpoints import CheckpointFormatError, find_original, load_expert
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.engine.models import BASE_MODEL_ENV, BUILTIN_MODELS, resolve_model

#: diffusers module path fragment → Wan original (wan/modules/model.py, vace_model.py), applied in order.
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.to_out.0.", ".self_attn.o."), (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."), (".attn2.to_", ".cross_attn."),
    (".attn1.norm_", ".self_attn.norm_"), (".attn2.norm_", ".cross_attn.norm_"),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # the affine cross-attention norm is `norm3` in the original blocks
    (".proj_in.", ".before_proj."),
]


def original_key(key: str) -> str:
    out = key
    for a, b in TO_ORIGINAL:
        out = out.replace(a, b)
    if out.startswith("vace_blocks."):
        out = out.replace(".proj_out.", ".after_proj.")
    if out.startswith("proj_out."):
        out = "head.head." + out.removeprefix("proj_out.")
    if out == "scale_shift_table":
        return "head.modulation"
    return out.replace(".scale_shift_table", ".modulation")


def write_original(transformer, folder: Path, *, shards: int = 1, prefix: str = "") -> list[Path]:
    """`transformer`'s weights under their original names, as one file or `shards` files plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {prefix + original_key(k): v.detach().contiguous() for k, v in transformer.state_dict().items()}
    assert len(set(sd)) == len(transformer.state_dict())
    if shards == 1:
        path = folder / "diffusion_pytorch_model.safetensors"
        save_file(sd, str(path))
        return [path]
    keys = sorted(sd)
    files, weight_map = [], {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
        files.append(folder / name)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return files


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert torch.equal(sa[k], sb[k]), k


def spec(**kw) -> JobSpec:
    return JobSpec(**{"model": "x", "prompt": "a man walks on the street", "width": 48, "height": 32,
                      "num_frames": 17, "num_inference_steps": 3, "seed": 4, **kw})


def bundle() -> ControlBundle:
    rng = np.random.default_rng(4)
    return ControlBundle(frames=rng.random((17, 32, 48, 3), dtype=np.float32), masks=np.ones((17, 32, 48), np.float32))


@pytest.fixture(scope="module")
def two_expert_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the Wan 2.2 A14B release layout — high_noise_model/ + low_noise_model/, original keys —, its base)."""
    from diffusers import WanVACEPipeline

    base = resolve_model("tiny-two-expert").path
    pipe = WanVACEPipeline.from_pretrained(base)
    root = tmp_path_factory.mktemp("Wan2.2-VACE-Fun-A14B")
    write_original(pipe.transformer, root / "high_noise_model")
    write_original(pipe.transformer_2, root / "low_noise_model", shards=2)
    (root / "configuration.json").write_text('{"framework": "Pytorch"}')  # what the release also carries
    return root, base


def test_two_expert_release_loads_through_model_dir_and_matches_the_diffusers_layout(
        two_expert_release, monkeypatch: pytest.MonkeyPatch) -> None:
    root, base = two_expert_release
    monkeypatch.setenv(BASE_MODEL_ENV, str(base))
    resolved = resolve_model(str(root))
    assert resolved.original is not None and resolved.original.two_experts and resolved.base == base
    ours = Engine(str(root), EngineOptions(offload="none"))
    ref = Engine("tiny-two-expert", EngineOptions(offload="none"))
    assert_same_weights(ours.pipe.transformer, ref.pipe.transformer)  # high noise → transformer
    assert_same_weights(ours.pipe.transformer_2, ref.pipe.transformer_2)  # low noise → transformer_2
    assert ours.two_experts and ours.pipe.config.boundary_ratio == 0.875
    assert ours.describe()["format"] == "original" and ref.describe()["format"] == "diffusers"
    s = spec(guidance_scale_2=3.0)
    assert np.array_equal(ours.generate(s, bundle(), seed=4), ref.generate(s, bundle(), seed=4))


def test_bf16_conversion_keeps_the_fp32_modules_from_pretrained_keeps(two_expert_release, monkeypatch) -> None:
    from diffusers import WanVACETransformer3DModel

    root, base = two_expert_release
    expert = load_expert(find_original(root).experts[0], base, torch.bfloat16)
    ref = WanVACETransformer3DModel.from_pretrained(base, subfolder="transformer", dtype=torch.bfloat16)
    assert_same_weights(expert, ref)
    assert expert.scale_shift_table.dtype == torch.float32
    assert expert.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_comfy_prefixed_sharded_single_expert_at_the_top_level(tmp_path: Path, monkeypatch) -> None:
    from diffusers import WanVACEPipeline

    base = resolve_model("tiny").path
    pipe = WanVACEPipeline.from_pretrained(base)
    write_original(pipe.transformer, tmp_path, shards=3, prefix="model.diffusion_model.")
    monkeypatch.setenv(BASE_MODEL_ENV, "tiny")
    resolved = resolve_model(str(tmp_path))
    assert resolved.original is not None and not resolved.original.two_experts
    assert len(resolved.original.experts[0]) == 3
    eng = Engine(str(tmp_path), EngineOptions(offload="none"))
    assert_same_weights(eng.pipe.transformer, pipe.transformer)
    assert eng.pipe.transformer_2 is None and not eng.two_experts


def test_checkpoints_that_do_not_fit_fail_with_one_clear_error(two_expert_release, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root, _base = two_expert_release
    monkeypatch.setenv(BASE_MODEL_ENV, "tiny")  # a base whose transformer has 3 layers / 2 VACE layers as well …
    wide = tmp_path / "wide"
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    other = WanVACETransformer3DModel(num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=32,
                                      num_layers=3, vace_layers=[0, 2], rope_max_seq_len=32)
    write_original(other, wide)  # … but width 32, not 24
    with pytest.raises(CheckpointFormatError, match=r"dim 32 \(base 24\).*VACE_BASE_MODEL"):
        Engine(str(wide), EngineOptions(offload="none"))

    t2v = tmp_path / "t2v"
    t2v.mkdir()
    sd = {k: v for k, v in _load(root / "high_noise_model").items() if "vace" not in k}
    save_file(sd, str(t2v / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="without the VACE branch"):
        resolve_model(str(t2v))

    broken = tmp_path / "broken"
    broken.mkdir()
    sd = _load(root / "high_noise_model")
    sd.pop("blocks.1.cross_attn.k.weight")
    save_file(sd, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"missing after diffusers' key conversion.*blocks\.1\.attn2\.to_k"):
        Engine(str(broken), EngineOptions(offload="none"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no model_index.json.*high_noise_model and low_noise_model"):
        resolve_model(str(empty))


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _fake_hub_cache(cache: Path, repo_id: str, source: Path, patterns: tuple[str, ...] | None) -> None:
    """A Hugging Face cache entry for `repo_id` holding `source`'s files (what `hf download` leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    for f in source.rglob("*"):
        rel = f.relative_to(source)
        if f.is_file() and (patterns is None or any(rel.match(p) or str(rel).startswith(p.rstrip("*"))
                                                     for p in patterns)):
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, snap / rel)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_builtin_wan22_is_the_official_release_converted_at_load(two_expert_release, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`wan2.2-vace-fun-a14b` names alibaba-pai's original-format repo (no personal namespace); from the Hub
    cache it loads with the components of the official Wan 2.1 VACE 14B diffusers repo."""
    info = BUILTIN_MODELS["wan2.2-vace-fun-a14b"]
    assert info.repo_id == "alibaba-pai/Wan2.2-VACE-Fun-A14B" and info.base == "wan2.1-vace-14b"
    assert all(m.repo_id.split("/")[0] in ("Wan-AI", "alibaba-pai") for m in BUILTIN_MODELS.values())
    root, base = two_expert_release
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotFoundError, match="vace-local download wan2.2-vace-fun-a14b"):
        resolve_model("wan2.2-vace-fun-a14b")
    _fake_hub_cache(cache, info.repo_id, root, None)
    _fake_hub_cache(cache, BUILTIN_MODELS["wan2.1-vace-14b"].repo_id, base,
                    ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "vae/*",
                     "transformer/config.json"))
    resolved = resolve_model("wan2.2-vace-fun-a14b")
    assert resolved.kind == "builtin" and resolved.original.two_experts
    assert not (resolved.base / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    eng = Engine("wan2.2-vace-fun-a14b", EngineOptions(offload="none"))
    ref = Engine("tiny-two-expert", EngineOptions(offload="none"))
    assert_same_weights(eng.pipe.transformer_2, ref.pipe.transformer_2)


def test_real_architecture_expert_with_original_keys_converts_exactly(tmp_path: Path) -> None:
    """The real 1.3B width (12 heads × 128, ffn 8960, text_dim 4096, real patch / VACE embeddings) at 2 layers +
    1 VACE layer, bf16: the converted expert equals `from_pretrained` of the diffusers layout, weights and output."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, vace_layers=[0], vace_in_channels=96)
    model = WanVACETransformer3DModel(**cfg).to(torch.bfloat16)
    base = tmp_path / "base"
    model.save_pretrained(base / "transformer")
    files = write_original(model, tmp_path / "release" / "high_noise_model")
    ref = WanVACETransformer3DModel.from_pretrained(base, subfolder="transformer", dtype=torch.bfloat16).eval()
    ours = load_expert(tuple(files), base, torch.bfloat16)
    assert_same_weights(ours, ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=g, dtype=torch.bfloat16)
    ctrl = torch.randn(1, 96, 2, 8, 8, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, 8, 4096, generator=g, dtype=torch.bfloat16)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = ours(x, t, text, control_hidden_states=ctrl, return_dict=False)[0]
        b = ref(x, t, text, control_hidden_states=ctrl, return_dict=False)[0]
    assert torch.equal(a, b)


def test_real_architecture_two_expert_release_loads_as_its_diffusers_source(
        realarch_wan22: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Wan 2.2 two-expert layout at the real 1.3B width (tests/realarch.py: real VAE / UMT5 / UniPC configs),
    written as the official release (high_noise_model/, low_noise_model/ sharded, original keys), loaded through
    `--model DIR` like any model: the engine holds exactly its diffusers-layout source's weights. (Frames are
    compared on the tiny two-expert model above: on this CPU the real VAE makes each job cost minutes.)"""
    from diffusers import WanVACEPipeline

    ref = WanVACEPipeline.from_pretrained(realarch_wan22)
    root = tmp_path / "Wan2.2-VACE-Fun-A14B"
    write_original(ref.transformer, root / "high_noise_model")
    write_original(ref.transformer_2, root / "low_noise_model", shards=2)
    monkeypatch.setenv(BASE_MODEL_ENV, str(realarch_wan22))
    ours = Engine(str(root), EngineOptions(offload="none", dtype="fp32"))
    assert ours.two_experts and ours.pipe.config.boundary_ratio == 0.875
    assert ours.describe()["path"] == str(root) and ours.describe()["format"] == "original"
    assert_same_weights(ours.pipe.transformer, ref.transformer)
    assert_same_weights(ours.pipe.transformer_2, ref.transformer_2)
    # the base's components, untouched (stored bf16, loaded at the engine's fp32)
    assert torch.equal(ours.pipe.text_encoder.shared.weight, ref.text_encoder.shared.weight.float())
    assert ours.vace_layers == [0] and ours.pipe.transformer.config.num_attention_heads == 12
