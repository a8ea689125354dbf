"""Real-architecture Wan VACE model directories for tests: the real classes and configs, at reduced depth.

A tiny toy model proves the plumbing, not the real paths (an offload hook that breaks on transformers'
`UMT5EncoderModel`, a tied weight, a 1536-wide attention). These builders write diffusers-layout directories that
look like the published repos — `model_index.json`, `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`,
`scheduler/` — with:

- `WanVACETransformer3DModel` at the Wan2.1-VACE-1.3B width (12 heads × 128, ffn 8960, text_dim 4096, in/out 16,
  vace_in_channels 96, rope_max_seq_len 1024, qk_norm rms_norm_across_heads), `num_layers` main blocks and
  `vace_layers` VACE blocks (defaults 2 and (0,); `num_layers=30, vace_layers=range(0, 30, 2)` is the full 1.3B);
- the real `AutoencoderKLWan` config (its defaults are the published Wan2.1 VAE config);
- transformers' `UMT5EncoderModel` with the UMT5-XXL widths (d_model 4096, d_ff 10240, 64 heads × 64) and
  `text_layers` layers; the vocabulary is small, from a T5-layout Unigram tokenizer built locally (`tokenizer.json`
  + `tokenizer_config.json`, loaded by `AutoTokenizer.from_pretrained`);
- the shipped UniPC `scheduler_config.json`, and `model_index.json` as the Wan-AI repos have it.

`build_wan22_vace` writes the Wan 2.2 two-expert layout (`transformer` = high-noise expert, `transformer_2` =
low-noise expert, `boundary_ratio` in `model_index.json`), by default at the same 1.3B width so CPU tests stay
fast (`heads=40, ffn_dim=13824` gives the A14B width).

Weights are random with fixed seeds (the same bytes on every build), stored like the published diffusers
checkpoints: the text encoder in bf16, transformer(s) and VAE in fp32. Each directory is built once and cached under
`$VACE_REALARCH_CACHE` (default `~/.cache/vace-local-tests/realarch`) in a folder named by a hash of the recipe
and the torch / diffusers / transformers versions; concurrent builders race harmlessly (atomic rename). Load them
exactly as real weights are loaded: `vace-local generate --model DIR`, `Engine(str(DIR))`, or
`WanVACEPipeline.from_pretrained(DIR)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Bumped whenever the recipe below changes in a way the parameters do not capture.
RECIPE_VERSION = 2
#: Wan2.1-VACE-1.3B transformer config (Wan-AI/Wan2.1-VACE-1.3B-diffusers/transformer/config.json) minus depth.
WAN13_TRANSFORMER: dict[str, Any] = {
    "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960,
    "freq_dim": 256, "image_dim": None, "in_channels": 16, "num_attention_heads": 12, "out_channels": 16,
    "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
    "text_dim": 4096, "vace_in_channels": 96,
}
#: UMT5-XXL encoder config (Wan-AI/*/text_encoder/config.json) minus depth and vocabulary size.
UMT5_XXL: dict[str, Any] = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-06, "initializer_factor": 1.0, "tie_word_embeddings": False, "pad_token_id": 0,
    "eos_token_id": 1, "decoder_start_token_id": 0, "num_decoder_layers": 0, "is_encoder_decoder": True,
}
#: The shipped scheduler/scheduler_config.json of the Wan2.1 VACE diffusers repos.
UNIPC_CONFIG: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "time_shift_type": "exponential",
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False, "use_dynamic_shifting": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}
WAN22_BOUNDARY_RATIO = 0.875
FULL_13B = {"num_layers": 30, "vace_layers": tuple(range(0, 30, 2))}

_WORDS = (
    "a an the cat dog video person walks runs jumps in on of and with to at red blue green white black yellow "
    "light dark city forest street road night day sun rain snow camera slow fast moving boxing ring woman man "
    "girl boy smiles dances sings water sky sea beach mountain car bird flower house tree grass old young small "
    "big bright blurry low quality static worst ugly deformed extra fingers"
).split()


def cache_root() -> Path:
    root = os.environ.get("VACE_REALARCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vace-local-tests", "realarch")
    return Path(root)


def _versions() -> dict[str, str]:
    import diffusers
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _key(recipe: dict[str, Any]) -> str:
    blob = json.dumps({"recipe": recipe, "v": RECIPE_VERSION, **_versions()}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tokenizer() -> Any:
    """A T5-layout Unigram tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, `▁`-words, letters), built with the
    `tokenizers` library — the same kind of `tokenizer.json` the real repos ship, with a small vocabulary."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -float(i) / 20 - 1.0) for i, w in enumerate(dict.fromkeys(_WORDS))]
    vocab += [(chr(c), -20.0) for c in range(ord("a"), ord("z") + 1)]
    vocab += [(c, -20.0) for c in ",.-'0123456789"] + [("▁", -5.0)]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _transformer(seed: int, num_layers: int, vace_layers: Sequence[int], heads: int, ffn_dim: int) -> Any:
    import torch
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    cfg = {**WAN13_TRANSFORMER, "num_attention_heads": heads, "ffn_dim": ffn_dim, "num_layers": num_layers,
           "vace_layers": list(vace_layers)}
    return WanVACETransformer3DModel(**cfg).eval()


def _text_encoder(seed: int, vocab_size: int, layers: int) -> Any:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, num_layers=layers, **UMT5_XXL)).eval()


def _write_pipeline(target: Path, *, experts: int, num_layers: int, vace_layers: Sequence[int], text_layers: int,
                    heads: int, ffn_dim: int, boundary_ratio: float | None, vae_base_dim: int) -> None:
    import torch
    from diffusers import AutoencoderKLWan

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(target / "tokenizer")
    _text_encoder(1, len(tokenizer), text_layers).to(torch.bfloat16).save_pretrained(target / "text_encoder")
    torch.manual_seed(2)
    # The defaults are the published Wan2.1 VAE config; a smaller base_dim keeps the structure, only narrower.
    vae = AutoencoderKLWan() if vae_base_dim == 96 else AutoencoderKLWan(base_dim=vae_base_dim)
    vae.eval().save_pretrained(target / "vae")
    _save_json(target / "scheduler" / "scheduler_config.json", UNIPC_CONFIG)
    names = ["transformer", "transformer_2"][:experts]
    for i, name in enumerate(names):
        model = _transformer(10 + i, num_layers, vace_layers, heads, ffn_dim)
        model.save_pretrained(target / name, max_shard_size="5GB")
        del model
    index: dict[str, Any] = {
        "_class_name": "WanVACEPipeline", "_diffusers_version": "0.35.0.dev0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanVACETransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if experts == 2:
        index["transformer_2"] = ["diffusers", "WanVACETransformer3DModel"]
        index["boundary_ratio"] = boundary_ratio
    _save_json(target / "model_index.json", index)


def _build(name: str, recipe: dict[str, Any], root: Path | None) -> Path:
    target = (root or cache_root()) / f"{name}-{_key(recipe)}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_pipeline(tmp, **recipe)
        (tmp / "BUILD.json").write_text(json.dumps({"recipe": recipe, **_versions()}, indent=2, default=list))
        tmp.rename(target)  # model_index.json appears only with a complete directory
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_wan21_vace(root: Path | None = None, *, num_layers: int = 2, vace_layers: Sequence[int] = (0,),
                     text_layers: int = 1, vae_base_dim: int = 96) -> Path:
    """A Wan2.1-VACE-1.3B-architecture diffusers directory (one expert) at `num_layers` depth; returns its path.

    `root` overrides the cache directory. `build_wan21_vace(**FULL_13B, text_layers=24)` is the real 1.3B size.
    `vae_base_dim` < 96 narrows the VAE (same class and structure) where a test runs many jobs on CPU: the real
    VAE dominates a small job's time there.
    """
    recipe = {"experts": 1, "num_layers": num_layers, "vace_layers": list(vace_layers), "text_layers": text_layers,
              "heads": 12, "ffn_dim": 8960, "boundary_ratio": None, "vae_base_dim": vae_base_dim}
    return _build("wan21-vace", recipe, root)


def build_wan22_vace(root: Path | None = None, *, num_layers: int = 2, vace_layers: Sequence[int] = (0,),
                     text_layers: int = 1, heads: int = 12, ffn_dim: int = 8960,
                     boundary_ratio: float = WAN22_BOUNDARY_RATIO, vae_base_dim: int = 96) -> Path:
    """The Wan2.2-VACE-Fun two-expert layout (`transformer` high-noise, `transformer_2` low-noise,
    `boundary_ratio`); 1.3B width by default, `heads=40, ffn_dim=13824` for the A14B width."""
    recipe = {"experts": 2, "num_layers": num_layers, "vace_layers": list(vace_layers), "text_layers": text_layers,
              "heads": heads, "ffn_dim": ffn_dim, "boundary_ratio": boundary_ratio, "vae_base_dim": vae_base_dim}
    return _build("wan22-vace", recipe, root)
