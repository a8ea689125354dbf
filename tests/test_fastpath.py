"""Fast-path options on the tiny model: text cache, attention backend isolation, batched CFG, fp8, compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vace_bench.synthetic import build_transformer
from vace_local.core.bundle import ControlBundle
from vace_local.core.spec import JobSpec
from vace_local.engine import fastpath
from vace_local.engine.engine import Engine, EngineOptions, get_engine

F, H, W = 17, 32, 48


def spec(**kw) -> JobSpec:
    base = dict(model="tiny", prompt="a dog runs in the city at night", width=W, height=H, num_frames=F,
                num_inference_steps=3, seed=3)
    base.update(kw)
    return JobSpec(**base)


def bundle() -> ControlBundle:
    rng = np.random.default_rng(1)
    masks = np.ones((F, H, W), dtype=np.float32)
    masks[:, : H // 2] = 0.0
    return ControlBundle(frames=rng.random((F, H, W, 3), dtype=np.float32), masks=masks)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return get_engine("tiny")


def tiny_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 3, 4, 6, generator=g), timestep=torch.tensor([700]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                control_hidden_states=torch.randn(1, 96, 3, 4, 6, generator=g), return_dict=False)


# -- text-embedding cache ---------------------------------------------------------------------------------
def test_text_cache_gives_the_pipelines_own_embeddings_and_skips_the_encoder(engine: Engine) -> None:
    prompt = "a red light over the water"
    with torch.no_grad():  # as inside WanVACEPipeline.__call__
        expected, _ = engine.pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                                max_sequence_length=512, device=engine.pipe._execution_device)
    assert torch.equal(engine._embed(prompt), expected)

    calls = []
    handle = engine.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        s = spec(prompt="the woman smiles and dances")
        first = engine.generate(s, bundle(), seed=3)
        n_first = len(calls)
        second = engine.generate(s, bundle(), seed=3)
    finally:
        handle.remove()
    assert n_first <= 2 and len(calls) == n_first  # second job: prompt and negative both from the cache
    assert np.array_equal(first, second)


def test_text_cache_off_gives_identical_output(engine: Engine) -> None:
    uncached = Engine("tiny", EngineOptions(text_cache=0))
    s = spec(prompt="a blue sky over the forest")
    assert np.array_equal(uncached.generate(s, bundle(), seed=3), engine.generate(s, bundle(), seed=3))
    assert len(uncached._text_cache) == 0 and "a blue sky over the forest" in engine._text_cache


def test_embeddings_through_the_cache_equal_the_pipeline_encoding_the_prompt_itself(engine: Engine) -> None:
    """The engine's output equals a stock pipeline call that is given the prompt strings."""
    s = spec(prompt="a cat walks", num_inference_steps=2)
    b = bundle()
    ours = engine.generate(s, b, seed=9)
    video = torch.from_numpy(b.frames).permute(0, 3, 1, 2).unsqueeze(0)
    mask = torch.from_numpy(b.masks).unsqueeze(1).expand(-1, 3, -1, -1).unsqueeze(0)
    engine.fast.remove()
    try:
        torch.manual_seed(9)
        out = engine.pipe(prompt=s.prompt, negative_prompt=s.effective_negative_prompt, video=video, mask=mask,
                          height=H, width=W, num_frames=F, num_inference_steps=2, guidance_scale=s.guidance_scale,
                          generator=torch.Generator("cpu").manual_seed(9), output_type="np")
    finally:
        for t in engine._transformers():
            engine.fast.install(t)
    stock = (np.asarray(out.frames[0]) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    assert np.array_equal(ours, stock)


# -- attention backend ------------------------------------------------------------------------------------
def test_selecting_a_backend_on_one_model_leaves_others_and_the_process_default_alone() -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    a = build_transformer("tiny", "cpu", torch.float32, seed=0)
    b = build_transformer("tiny", "cpu", torch.float32, seed=0)
    before_default = _AttentionBackendRegistry.get_active_backend()[0]
    with torch.no_grad():
        b_before = b(**tiny_inputs())[0]
        a_before = a(**tiny_inputs())[0]
    choice = fastpath.select_attention_backend([a], "_native_math", "cpu", torch.float32)
    assert choice.name == "_native_math"
    assert fastpath.model_attention_backends(a) == {"_native_math"}
    assert fastpath.model_attention_backends(b) == {None}
    assert _AttentionBackendRegistry.get_active_backend()[0] == before_default
    with torch.no_grad():
        assert torch.equal(b(**tiny_inputs())[0], b_before)
        assert torch.allclose(a(**tiny_inputs())[0], a_before, atol=1e-5)


def test_unavailable_backend_falls_back_cleanly_and_unknown_is_refused() -> None:
    m = build_transformer("tiny", "cpu", torch.float32)
    choice = fastpath.select_attention_backend([m], "fa3", "cpu", torch.float32)  # alias of _flash_3
    assert choice.name == "native" and choice.requested == "_flash_3"
    assert "_flash_3" in dict(choice.rejected)
    assert fastpath.model_attention_backends(m) == {"native"}
    with pytest.raises(ValueError, match="attention must be"):
        fastpath.select_attention_backend([m], "warp-speed", "cpu", torch.float32)


def test_engine_records_its_fast_path(engine: Engine) -> None:
    fp = engine.describe()["fast_path"]
    assert fp["attention"]["backend"] == "native"  # CPU auto
    assert fp["text_cache"] == 32 and fp["cfg_batch"] is False and fp["compile"] is False
    assert fp["fp8_storage"] is False and fp["fp8_linear"] is False and fp["loras"] == []


# -- batched CFG ------------------------------------------------------------------------------------------
def test_batched_cfg_equals_two_passes(engine: Engine) -> None:
    batched = Engine("tiny", EngineOptions(cfg_batch=True))
    s = spec(num_inference_steps=4)
    two = engine.generate(s, bundle(), seed=3)
    assert engine.last_run["forwards"] == 8
    one = batched.generate(s, bundle(), seed=3)
    assert batched.last_run["forwards"] == 4
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1  # float reassociation only

    # At the transformer level the batched prediction matches within float tolerance.
    t = batched.pipe.transformer
    kw = tiny_inputs()
    neg = torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(5))
    batched.fast.begin_job(total_steps=1, negative=neg, cfg_batch=True)
    try:
        with torch.no_grad():  # the branch comes from the cache context, as the pipeline announces it
            with t.cache_context("cond"):
                cond = t(**kw)[0]
            with t.cache_context("uncond"):
                uncond = t(**{**kw, "encoder_hidden_states": neg})[0]
    finally:
        stats = batched.fast.end_job()
    assert stats.forwards == 1
    with torch.no_grad():
        ref_c = t(**kw)[0]
        ref_u = t(**{**kw, "encoder_hidden_states": neg})[0]
    assert torch.allclose(cond, ref_c, atol=1e-5) and torch.allclose(uncond, ref_u, atol=1e-5)


def test_no_cfg_job_with_batching_on_runs_one_forward_per_step() -> None:
    eng = Engine("tiny", EngineOptions(cfg_batch=True))
    eng.generate(spec(guidance_scale=1.0), bundle(), seed=3)
    assert eng.last_run["forwards"] == 3


# -- fp8 storage, fp8 linear, compile ----------------------------------------------------------------------
def test_footprint_counts_fp8_storage_at_one_byte_per_weight(engine: Engine) -> None:
    """The memory policy budgets from `footprint()`: under fp8 storage it must count the stored bytes."""
    fp8 = Engine("tiny", EngineOptions(fp8_storage=True))
    params = list(fp8.pipe.transformer.parameters())
    stored = sum(p.numel() for p in params if p.dtype == torch.float8_e4m3fn)
    kept = sum(p.numel() for p in params if p.dtype == torch.float32)  # the layers layerwise casting skips
    assert stored > kept > 0 and stored + kept == sum(p.numel() for p in params)
    assert fp8.footprint().transformer == stored + 4 * kept
    assert engine.footprint().transformer == 4 * (stored + kept)  # fp32 on the CPU
    assert fp8.footprint().text_encoder == engine.footprint().text_encoder
    assert fp8.footprint().vae == engine.footprint().vae == 4 * sum(p.numel() for p in engine.pipe.vae.parameters())


def test_fp8_storage_halves_weight_bytes_and_stays_close(engine: Engine) -> None:
    fp8 = Engine("tiny", EngineOptions(fp8_storage=True))
    q = fp8.pipe.transformer.blocks[0].attn1.to_q.weight
    assert q.dtype == torch.float8_e4m3fn
    assert fp8.pipe.transformer.patch_embedding.weight.dtype == torch.float32  # skipped: precision-sensitive
    s = spec()
    a = engine.generate(s, bundle(), seed=3).astype(np.float32)
    b = fp8.generate(s, bundle(), seed=3).astype(np.float32)
    other = engine.generate(s, bundle(), seed=4).astype(np.float32)
    assert np.abs(a - b).mean() < 0.5 * np.abs(a - other).mean()
    assert fp8.describe()["fast_path"]["fp8_storage"] is True


def test_fp8_linear_needs_cuda_and_options_are_exclusive() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(RuntimeError, match="CUDA"):
        fastpath.enable_fp8_linear(build_transformer("tiny", "cpu", torch.float32))
    with pytest.raises(ValueError, match="exclusive"):
        EngineOptions(fp8_storage=True, fp8_linear=True)


def test_fp8_linear_filter_keeps_embeddings_and_head() -> None:
    m = build_transformer("tiny", "cpu", torch.float32)
    picked = {n for n, mod in m.named_modules() if fastpath.fp8_linear_filter(mod, n)}
    assert "blocks.0.attn1.to_q" in picked and "vace_blocks.0.proj_out" in picked
    assert not any(n.startswith(("condition_embedder", "proj_out", "patch_embedding")) for n in picked)


def test_regional_compile_wraps_the_repeated_blocks_and_keeps_output(engine: Engine) -> None:
    compiled = Engine("tiny", EngineOptions(compile=True, compile_backend="eager"))
    t = compiled.pipe.transformer
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in [*t.blocks, *t.vace_blocks])
    s = spec(num_inference_steps=2)
    assert np.array_equal(compiled.generate(s, bundle(), seed=3), engine.generate(s, bundle(), seed=3))
    assert compiled.describe()["fast_path"]["compile"] == "eager"


# -- CUDA-only behaviour (taken on the GPU runner) ----------------------------------------------------------
@pytest.mark.gpu
def test_gpu_auto_attention_picks_a_fused_kernel_and_matches_sdpa() -> None:
    a = build_transformer("tiny", "cuda", torch.bfloat16)
    choice = fastpath.select_attention_backend([a], "auto", "cuda", torch.bfloat16)
    assert choice.name in fastpath.CUDA_AUTO_ORDER
    kw = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in tiny_inputs().items()
          if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        fast = a(**kw, return_dict=False)[0]
        fastpath.select_attention_backend([a], "native", "cuda", torch.bfloat16)
        ref = a(**kw, return_dict=False)[0]
    assert torch.allclose(fast.float(), ref.float(), atol=3e-2)


@pytest.mark.gpu
def test_gpu_fp8_linear_runs_and_stays_close() -> None:
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    ref = Engine("tiny", EngineOptions(device="cuda", dtype="bf16"))
    fp8 = Engine("tiny", EngineOptions(device="cuda", dtype="bf16", fp8_linear=True))
    s = spec()
    a = ref.generate(s, bundle(), seed=3).astype(np.float32)
    b = fp8.generate(s, bundle(), seed=3).astype(np.float32)
    assert np.abs(a - b).mean() < 20


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["group", "sequential", "model"])
def test_gpu_offload_modes_match_resident(offload: str) -> None:
    ref = Engine("tiny", EngineOptions(device="cuda", dtype="bf16", offload="none"))
    off = Engine("tiny", EngineOptions(device="cuda", dtype="bf16", offload=offload))
    s = spec()
    a = ref.generate(s, bundle(), seed=3).astype(np.float32)
    b = off.generate(s, bundle(), seed=3).astype(np.float32)
    assert np.abs(a - b).mean() < 2  # issue #11981: block-level + streams once degraded outputs


@pytest.mark.gpu
def test_gpu_inductor_compile_matches_eager() -> None:
    ref = Engine("tiny", EngineOptions(device="cuda", dtype="bf16"))
    comp = Engine("tiny", EngineOptions(device="cuda", dtype="bf16", compile=True))
    s = spec()
    a = ref.generate(s, bundle(), seed=3).astype(np.float32)
    b = comp.generate(s, bundle(), seed=3).astype(np.float32)
    assert np.abs(a - b).mean() < 2
