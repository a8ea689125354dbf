"""Tiny random-weight Wan VACE pipelines, built in code, saved to disk and loaded like real weights.

The `tiny` model runs the whole stack (CLI, server, tests) fully offline. It has the real architecture
classes with toy sizes, so everything from `from_pretrained` down goes through the same code as the 14B
model; its output is noise. `tiny-two-expert` adds a `transformer_2` and `boundary_ratio` like Wan 2.2.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_MODELS = ("tiny", "tiny-two-expert")
#: Bumped whenever the tiny recipe changes so stale cached copies are rebuilt.
TINY_VERSION = 1
BOUNDARY_RATIO = 0.875

_WORDS = (
    "a the cat dog video person walks runs in on of and with red blue green light dark city forest street "
    "night day camera slow fast moving boxing ring woman man smiles dances water sky"
).split()


def default_cache_dir() -> Path:
    root = os.environ.get("VACE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vace-local")
    return Path(root)


def _build_tokenizer():  # noqa: ANN202 - transformers tokenizer
    """A T5-layout Unigram tokenizer built in memory (no sentencepiece file, no Hub)."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -float(i) / 10 - 1.0) for i, w in enumerate(_WORDS)]
    vocab += [(chr(c), -20.0) for c in range(ord("a"), ord("z") + 1)]
    vocab += [("▁", -5.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_pipeline(two_experts: bool = False):  # noqa: ANN201 - WanVACEPipeline
    """Construct the tiny pipeline with fixed seeds (the same weights every time)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _build_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=0,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()

    def transformer(seed: int) -> WanVACETransformer3DModel:
        torch.manual_seed(seed)
        # rope_max_seq_len stays at the real default so the tiny model also serves real sizes (832x480).
        return WanVACETransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, vace_layers=[0, 2], vace_in_channels=96,
        ).eval()

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return WanVACEPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=transformer(0), transformer_2=transformer(1) if two_experts else None,
        boundary_ratio=BOUNDARY_RATIO if two_experts else None,
    )


def ensure_tiny_model(name: str = "tiny", cache_dir: Path | None = None) -> Path:
    """Build and save the tiny pipeline once (idempotent); return the directory to `from_pretrained`."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    target = (cache_dir or default_cache_dir()) / "tiny" / f"{name}-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pipe = build_tiny_pipeline(two_experts=name == "tiny-two-expert")
    pipe.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent builders race harmlessly
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
