"""Real-size Wan VACE pipelines with random weights, for the benchmark (speed and memory only).

Speed and memory do not depend on weight values, so the benchmark builds the published architectures
(`WanVACETransformer3DModel` 14B / 1.3B, UMT5-XXL encoder, Wan VAE) without downloading anything.
Parameters are created on the meta device (no slow CPU init of 17 B parameters) and materialised
directly on the target device with a scaled normal init, which keeps activations finite through 40
blocks so fp8-vs-bf16 differences are meaningful. Buffers (RoPE tables) are built normally.
From the transformer call down this is the same code path as real weights.
"""

from __future__ import annotations

import math
from typing import Any

from vace_local.engine.checkpoints import keep_fp32_modules

#: Published transformer configs (diffusers-wan-notes §8). `tiny` is the test model's config.
TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "14b": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        vace_layers=[0, 5, 10, 15, 20, 25, 30, 35], vace_in_channels=96,
    ),
    "1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        vace_layers=list(range(0, 30, 2)), vace_in_channels=96,
    ),
    "tiny": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, vace_layers=[0, 2], vace_in_channels=96,
    ),
}
UMT5_CONFIGS: dict[str, dict[str, Any]] = {
    "xxl": dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=256384,
                relative_attention_num_buckets=32, relative_attention_max_distance=128),
    "tiny": dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=256,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16),
}
#: The real Wan 2.1 VAE is AutoencoderKLWan's default config; `tiny` matches the test model.
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "wan": {},
    "tiny": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True]),
}
#: model size → (transformer, text encoder, VAE) configs.
SIZES = {"14b": ("14b", "xxl", "wan"), "1.3b": ("1.3b", "xxl", "wan"), "tiny": ("tiny", "tiny", "tiny")}


def materialize(module: Any, device: Any, dtype: Any, seed: int = 0) -> Any:
    """Replace every meta parameter by a freshly initialised one on `device` (no CPU copy)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if p.ndim >= 2:  # linear / conv / embedding weights: keep activations O(1)
                fan_in = math.prod(p.shape[1:])
                t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            elif name == "weight":  # norm scales
                t.fill_(1.0)
            else:
                t.zero_()
            mod._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.to(device)
    return module


def build_transformer(size: str, device: Any, dtype: Any, seed: int = 0) -> Any:
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanVACETransformer3DModel

    with init_empty_weights(include_buffers=False):
        model = WanVACETransformer3DModel(**TRANSFORMER_CONFIGS[size])
    materialize(model, device, dtype, seed)
    if dtype != torch.float32:
        keep_fp32_modules(model)
    return model.eval()


def text_encoder_config(size: str) -> dict[str, Any]:
    """The `UMT5EncoderModel` config of `size` (xxl: the Wan repos' text_encoder/config.json widths)."""
    return dict(**UMT5_CONFIGS[size], num_decoder_layers=0, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                pad_token_id=0, eos_token_id=1)


def build_text_encoder(size: str, device: Any, dtype: Any, seed: int = 1) -> Any:
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**text_encoder_config(size))
    with init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(cfg)
    materialize(model, device, dtype, seed)
    return model.eval()


def build_vae(size: str, device: Any, seed: int = 2) -> Any:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLWan(**VAE_CONFIGS[size])
    materialize(vae, device, torch.float32, seed)
    return vae.eval()


def build_pipeline(size: str, device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A `WanVACEPipeline` with the published architecture of `size` and random weights, on `device`."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline

    from vace_local.engine.tiny import _build_tokenizer

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    t_cfg, e_cfg, v_cfg = SIZES[size]
    # The real UMT5 tokenizer is not available offline; the in-memory T5 tokenizer yields valid ids and
    # the pipeline pads to 512 tokens anyway, so the text encoder does the same work.
    tokenizer = _build_tokenizer()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanVACEPipeline(
        tokenizer=tokenizer, text_encoder=build_text_encoder(e_cfg, device, dtype, seed + 1),
        vae=build_vae(v_cfg, device, seed + 2), scheduler=scheduler,
        transformer=build_transformer(t_cfg, device, dtype, seed),
    )
