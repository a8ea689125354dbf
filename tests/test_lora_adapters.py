"""Per-request LoRAs (`JobSpec.loras`): adapters switched per job on one loaded model, never a reload.

A sequence A → B → none (→ A again) on ONE engine must give the frames of fresh engines each loaded with only that
LoRA fused (or none), same seed. Tolerance: 1e-4 absolute on float frames in [0, 1] (adapter vs fused is a
different float summation order: x·W + s·(x·A)·B vs x·(W + s·B·A); measured ~1e-7 on the tiny model).
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_lora import alpha_everywhere_lora, bundle, diffusers_lora, kijai_lora, musubi_lora, spec
from vace_local.core.errors import InputError
from vace_local.core.lora_sources import LoraFiles, hf_url
from vace_local.core.spec import JobSpec, LoraRef
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.engine.lora import LoraOption

TOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    out = {"a": d / "kijai_a.safetensors", "b": d / "peft_b.safetensors"}
    save_file(kijai_lora(), str(out["a"]))
    save_file(diffusers_lora(), str(out["b"]))
    return out


def fused(model: str, path: Path | None, scale: float = 1.0, **kw) -> np.ndarray:
    loras = (LoraOption(str(path), scale=scale),) if path else ()
    return Engine(model, EngineOptions(loras=loras, **kw)).sample(spec(model=model), bundle(), seed=2).frames


def test_a_then_b_then_none_on_one_engine_matches_fresh_fused_engines(files: dict[str, Path]) -> None:
    eng = Engine("tiny", EngineOptions(lora_adapters=2))
    seq = [[LoraRef(path=str(files["a"]), scale=0.7)], [LoraRef(path=str(files["b"]))], [],
           [LoraRef(path=str(files["a"]), scale=0.7)]]
    gens = [eng.sample(spec(loras=x), bundle(), seed=2) for x in seq]
    want = [fused("tiny", files["a"], 0.7), fused("tiny", files["b"]), fused("tiny", None)]
    for got, ref in zip(gens, [*want, want[0]], strict=True):
        assert np.abs(got.frames - ref).max() < TOL
    assert np.abs(want[0] - want[2]).max() > 1e-2  # the LoRA does change the output
    names = [[x["file"] for x in g.stats.loras] for g in gens]
    assert names == [["kijai_a.safetensors"], ["peft_b.safetensors"], [], ["kijai_a.safetensors"]]
    assert gens[0].stats.loras[0]["adapter"] == gens[3].stats.loras[0]["adapter"]  # reused from the LRU
    assert eng.adapters.loads == 2 and sorted(eng.describe()["lora_adapters"]["loaded"]) == ["job1", "job2"]


def test_lru_capacity_drops_the_least_recently_used(files: dict[str, Path], tmp_path: Path) -> None:
    c = tmp_path / "c.safetensors"
    save_file(kijai_lora(seed=3), str(c))
    eng = Engine("tiny", EngineOptions(lora_adapters=2))
    for p in (files["a"], files["b"], c):
        eng.sample(spec(loras=[LoraRef(path=str(p))], num_inference_steps=1), bundle(), seed=2)
    assert eng.adapters.loads == 3 and len(eng.adapters.loaded) == 2
    assert set(eng.pipe.transformer.peft_config) == {"job2", "job3"}
    # the base weights were never changed: no LoRA gives the fresh engine's frames
    assert np.abs(eng.sample(spec(), bundle(), seed=2).frames - fused("tiny", None)).max() < TOL


def test_distillation_schedule_applies_to_its_job_only(files: dict[str, Path]) -> None:
    eng = Engine("tiny", EngineOptions())
    distill = LoraRef(path=str(files["a"]), scale=0.5, num_inference_steps=2, guidance_scale=1.0, flow_shift=5.0)
    first = eng.sample(spec(loras=[distill], num_inference_steps=4), bundle(), seed=2).stats
    second = eng.sample(spec(num_inference_steps=4), bundle(), seed=2).stats
    assert (first.num_inference_steps, first.guidance_scale, first.flow_shift) == (2, 1.0, 5.0)
    assert first.cache is not None and first.cache.as_dict()["forwards"] == 2  # guidance 1: no uncond pass
    assert (second.num_inference_steps, second.guidance_scale, second.flow_shift) == (4, 5.0, 16.0)
    assert eng.effective_spec(spec(num_inference_steps=4)).num_inference_steps == 4


def test_two_expert_transformer_field_targets_the_chosen_expert(files: dict[str, Path]) -> None:
    eng = Engine("tiny-two-expert", EngineOptions())
    got = eng.sample(spec(model="tiny-two-expert", loras=[LoraRef(path=str(files["a"]), transformer="low")]),
                     bundle(), seed=2)
    assert got.stats.loras[0]["experts"] == ["transformer_2"]
    ref = Engine("tiny-two-expert", EngineOptions(loras=(LoraOption(str(files["a"]), experts="low"),)))
    assert np.abs(got.frames - ref.sample(spec(model="tiny-two-expert"), bundle(), seed=2).frames).max() < TOL
    with pytest.raises(InputError, match=r"loras\[0\]\.transformer"):
        Engine("tiny", EngineOptions()).sample(spec(loras=[LoraRef(path=str(files["a"]), transformer="low")]),
                                               bundle(), seed=2)


def test_bad_loras_fail_their_job_naming_the_field_and_the_model_stays_usable(files: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    eng = Engine("tiny", EngineOptions())
    base = eng.sample(spec(num_inference_steps=1), bundle(), seed=2).frames
    g = torch.Generator().manual_seed(0)
    bad = {
        # an SDXL-style kohya LoRA: another model family
        "sdxl": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320, generator=g),
                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4, generator=g),
                 "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
        # Wan keys, but for a layer this model does not have
        "unknown": {"transformer.blocks.99.attn1.to_q.lora_A.weight": torch.randn(4, 24, generator=g),
                    "transformer.blocks.99.attn1.to_q.lora_B.weight": torch.randn(24, 4, generator=g)},
        # Wan 14B widths on the tiny model: another size
        "size": {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 5120, generator=g),
                 "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(5120, 4, generator=g)},
    }
    for name, sd in bad.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        loras = [LoraRef(path=str(files["a"])), LoraRef(path=str(path))]
        with pytest.raises(InputError, match=rf"loras\[1\]\.path.*{name}\.safetensors") as e:
            eng.sample(spec(loras=loras, num_inference_steps=1), bundle(), seed=2)
        assert e.value.field == "loras[1].path", name
    assert eng.adapters.loaded == ["job1"]  # the bad ones left nothing behind
    with pytest.raises(InputError, match=r"loras\[0\]\.path.*not found"):
        eng.sample(spec(loras=[LoraRef(path=str(tmp_path / "missing.safetensors"))]), bundle(), seed=2)
    assert np.array_equal(eng.sample(spec(num_inference_steps=1), bundle(), seed=2).frames, base)


def test_compile_writes_loras_into_a_fixed_slot_without_recompiling(files: dict[str, Path], tmp_path: Path) -> None:
    """With --compile a job's LoRAs go into one fixed adapter slot: A, B, none, another scale give the fused
    engines' frames and dynamo compiles no new graph after the first job (each of them recompiles with plain
    adapters). A LoRA wider than the slot, or a job whose LoRAs add up past it, fails with the field named."""
    from torch._dynamo.utils import counters

    eng = Engine("tiny", EngineOptions(compile=True, compile_backend="eager", lora_slot_rank=6))
    assert eng.describe()["lora_adapters"]["mode"] == "compiled-slot"
    two = spec(num_inference_steps=2)
    eng.sample(two, bundle(), seed=2)
    graphs = counters["stats"]["unique_graphs"]
    seq = [(0.7, files["a"]), (1.0, files["b"]), (0.0, None), (0.4, files["a"])]
    for scale, path in seq:
        loras = [LoraRef(path=str(path), scale=scale)] if path else []
        got = eng.sample(spec(loras=loras, num_inference_steps=2), bundle(), seed=2)
        want = Engine("tiny", EngineOptions(loras=(LoraOption(str(path), scale=scale),) if path else ())).sample(
            two, bundle(), seed=2)
        assert np.abs(got.frames - want.frames).max() < TOL, (scale, path)
        assert [x["file"] for x in got.stats.loras] == ([path.name] if path else [])
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for a new LoRA, a scale, or none
    wide = tmp_path / "wide.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(8, 24, generator=g),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(24, 8, generator=g)}, str(wide))
    with pytest.raises(InputError, match=r"loras\[0\]\.path.*rank 8.*slot of rank 6"):
        eng.sample(spec(loras=[LoraRef(path=str(wide))], num_inference_steps=1), bundle(), seed=2)
    both = [LoraRef(path=str(files["a"])), LoraRef(path=str(files["b"]))]  # rank 4 + 4 on blocks.N.attn1.to_q
    with pytest.raises(InputError, match=r"loras: .*add up to rank 8"):
        eng.sample(spec(loras=both, num_inference_steps=1), bundle(), seed=2)
    assert np.abs(eng.sample(two, bundle(), seed=2).frames -
                  Engine("tiny", EngineOptions()).sample(two, bundle(), seed=2).frames).max() < TOL


def test_refused_loras_say_why_in_the_error_and_describe() -> None:
    for opts, why in [(EngineOptions(compile=True, compile_backend="eager", lora_slot_rank=0), "recompile"),
                      (EngineOptions(compile=True, compile_backend="eager", offload="group"), "offload 'group'")]:
        eng = Engine("tiny", opts)
        d = eng.describe()["lora_adapters"]
        assert d["mode"] == "refused" and why in d["refused"]
        with pytest.raises(InputError, match=f"loras: per-request LoRAs are not available with --compile.*{why}"):
            eng.sample(spec(loras=[LoraRef(path="x.safetensors")], num_inference_steps=1), bundle(), seed=2)


def test_sources_lora_dir_hugging_face_url_cache_and_limits(files: dict[str, Path], tmp_path: Path) -> None:
    """Folder names, URLs through the guarded downloader (real HTTP on loopback, size limit), the cache's bound."""
    from vace_local.core.http_guard import fetch_url

    served = tmp_path / "served"
    served.mkdir()
    (served / "a.safetensors").write_bytes(files["a"].read_bytes())
    (served / "b.safetensors").write_bytes(files["b"].read_bytes())
    (served / "page.safetensors").write_text("<html>not found</html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        def download(url: str, dest: Path, field: str, limit: int = 1 << 20) -> Path:
            return fetch_url(url, dest, field, max_bytes=limit, timeout_s=10)

        size_a = files["a"].stat().st_size
        lf = LoraFiles(tmp_path / "cache", download, lora_dir=files["a"].parent, cache_bytes=size_a + 10)
        assert lf.resolve(LoraRef(path="kijai_a"), "loras[0].path") == files["a"].resolve()
        with pytest.raises(InputError, match=r"loras\[0\]\.path: no file named '\.\./x'"):
            lf.resolve(LoraRef(path="../x"), "loras[0].path")
        with pytest.raises(InputError, match="not an http"):
            lf.resolve(LoraRef(path="/etc/passwd"), "loras[0].path")  # the server never reads arbitrary paths
        got_a = lf.resolve(LoraRef(path=f"{base}/a.safetensors"), "loras[0].path")
        assert got_a.read_bytes() == files["a"].read_bytes()
        got_b = lf.resolve(LoraRef(path=f"{base}/b.safetensors"), "loras[1].path")
        assert got_b.is_file() and not got_a.exists()  # the size bound evicted the least recently used
        with pytest.raises(InputError, match=r"loras\[0\]\.path.*not a \.safetensors"):
            lf.resolve(LoraRef(path=f"{base}/page.safetensors"), "loras[0].path")
        small = LoraFiles(tmp_path / "c2", lambda u, d, f: download(u, d, f, limit=100))
        with pytest.raises(InputError, match=r"loras\[2\]\.path.*limit"):
            small.resolve(LoraRef(path=f"{base}/a.safetensors"), "loras[2].path")
        assert not list((tmp_path / "c2").iterdir())
    finally:
        httpd.shutdown()
    assert hf_url("lightx2v/Wan2.1-Distill-Loras/x/y.safetensors", None) == \
        "https://huggingface.co/lightx2v/Wan2.1-Distill-Loras/resolve/main/x/y.safetensors"
    assert hf_url("Kijai/WanVideo_comfy", "Wan21_CausVid_14B_T2V_lora_rank32.safetensors").endswith(
        "/Kijai/WanVideo_comfy/resolve/main/Wan21_CausVid_14B_T2V_lora_rank32.safetensors")
    assert hf_url("Kijai/WanVideo_comfy", None) is None and hf_url("a/../b/c", None) is None


def test_spec_rules() -> None:
    with pytest.raises(ValueError, match="scale"):
        LoraRef(path="x", scale=5)
    with pytest.raises(ValueError, match="transformer"):
        LoraRef(path="x", transformer="middle")
    with pytest.raises(ValueError, match="loras"):
        JobSpec(loras=[{"path": "x"}] * 5)


@pytest.mark.parametrize(("offload", "fast"), [("none", False), ("model", False), ("group", False),
                                               ("sequential", False), ("none", True), ("model", True)],
                         ids=["none", "model", "group", "sequential", "none-cfg_batch-step_cache",
                              "model-cfg_batch-step_cache"])
def test_real_architecture_switching_matches_fresh_fused_engines(realarch_wan21_narrow_vae: Path, tmp_path: Path,
                                                                 offload: str, fast: bool) -> None:
    """Kijai (alphas on embedders / head) then musubi then none on one real-architecture engine (1.3B widths,
    loaded from disk), under every memory policy (sequential included: the adapter layers are put under its
    hooks) and with batched CFG + the step cache, vs fresh engines with only that LoRA fused: same frames and the
    same sampling statistics on every job."""
    from diffusers import WanVACEPipeline

    model = str(realarch_wan21_narrow_vae)
    t = WanVACEPipeline.from_pretrained(model).transformer
    paths = {"kijai": tmp_path / "kijai.safetensors", "musubi": tmp_path / "musubi.safetensors"}
    save_file(alpha_everywhere_lora(t, rank=8, alpha=4.0), str(paths["kijai"]))
    save_file(musubi_lora(t), str(paths["musubi"]))
    del t
    opts = dict(offload=offload, dtype="fp32", cfg_batch=fast)

    def job(loras: list[LoraRef]) -> JobSpec:
        if fast:  # 4 steps, a threshold that skips some: the step cache's decisions must follow the adapter
            return spec(model=model, loras=loras, num_inference_steps=4, step_cache_threshold=0.05)
        return spec(model=model, loras=loras, num_inference_steps=2)

    eng = Engine(model, EngineOptions(**opts))
    seq = [[LoraRef(path=str(paths["kijai"]), scale=0.5)], [LoraRef(path=str(paths["musubi"]), scale=0.8)], []]
    got = [eng.sample(job(x), bundle(), seed=2) for x in seq]
    refs = [Engine(model, EngineOptions(loras=lo, **opts)).sample(job([]), bundle(), seed=2)
            for lo in ((LoraOption(str(paths["kijai"]), scale=0.5),), (LoraOption(str(paths["musubi"]), scale=0.8),),
                       ())]
    for g, ref in zip(got, refs, strict=True):
        assert np.abs(g.frames - ref.frames).max() < TOL
        steps, ref_steps = g.stats.cache, ref.stats.cache
        assert steps is not None and ref_steps is not None and steps.computed > 0
        assert (steps.forwards, steps.computed, steps.skipped_steps) == (
            ref_steps.forwards, ref_steps.computed, ref_steps.skipped_steps)
    assert np.abs(refs[0].frames - refs[2].frames).max() > 1e-3
    assert [[x["file"] for x in g.stats.loras] for g in got] == [["kijai.safetensors"], ["musubi.safetensors"], []]
    assert eng.policy == offload
    _check_adapter_placement(eng)


def _check_adapter_placement(eng: Engine) -> None:
    """The adapter layers follow the memory policy like the base layers: under sequential offload their weights
    wait on `meta` with accelerate's hook holding the CPU copy; under group offload they belong to an offload group
    (on a GPU they would otherwise stay on the CPU)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in eng.pipe.transformer.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        for name in layer.lora_A:
            for lin in (layer.lora_A[name], layer.lora_B[name]):
                if eng.policy == "sequential":
                    assert lin.weight.device.type == "meta" and lin._hf_hook.offload
                    assert lin._hf_hook.weights_map["weight"].device.type == "cpu"
                elif eng.policy == "group":
                    assert lin._diffusers_hook.get_hook("group_offloading") is not None


def test_every_dialect_takes_loras_and_names_a_bad_one() -> None:
    """fal, AI/ML, WaveSpeed and OpenAI (JSON list, or one JSON text as the SDK's multipart sends it)."""
    from pydantic import ValidationError

    from server.dialects.aiml.serving import aiml_to_jobspec, parse_aiml_request
    from server.dialects.fal.serving import fal_to_jobspec, parse_fal_request
    from server.dialects.openai.serving import parse_request
    from server.dialects.openai.serving import to_spec as openai_spec
    from server.dialects.wavespeed.schemas import WanVaceInput
    from server.dialects.wavespeed.serving import to_spec as wavespeed_spec
    from vace_local.core.errors import problems_from_pydantic

    loras = [{"path": "style_a", "scale": 0.5}, {"path": "o/r", "weight_name": "low.safetensors",
                                                 "transformer": "low", "num_inference_steps": 4}]
    video = "https://example.invalid/v.mp4"
    specs = [
        fal_to_jobspec("pose", parse_fal_request("pose", {"prompt": "p", "video_url": video, "loras": loras}),
                       model="tiny").spec,
        aiml_to_jobspec(parse_aiml_request({"model": "alibaba/wan2.2-vace-fun-a14b-pose", "video_url": video,
                                            "prompt": "p", "loras": loras}), model="tiny").spec,
        wavespeed_spec(WanVaceInput(prompt="p", loras=loras))[0],
        openai_spec(parse_request({"prompt": "p", "loras": loras}), None)[0],
        openai_spec(parse_request({"prompt": "p", "loras": json.dumps(loras)}), None)[0],
    ]
    for s in specs:
        assert [x.model_dump(exclude_none=True) for x in s.loras] == [
            {"path": "style_a", "scale": 0.5, "transformer": "both"},
            {"path": "o/r", "scale": 1.0, "transformer": "low", "weight_name": "low.safetensors",
             "num_inference_steps": 4}]
    with pytest.raises(ValidationError) as e:
        parse_fal_request("depth", {"prompt": "p", "video_url": video, "loras": [{"path": "a", "scale": 9}]})
    assert [p.field for p in problems_from_pydantic(e.value.errors())] == ["loras[0].scale"]
    with pytest.raises(ValidationError) as e:
        WanVaceInput(prompt="p", loras=[{"path": "a", "transformer": "middle"}])
    assert [p.field for p in problems_from_pydantic(e.value.errors())] == ["loras[0].transformer"]
