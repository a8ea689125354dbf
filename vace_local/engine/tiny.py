"""Tiny random-weight Wan VACE pipelines, built in code, saved to disk and loaded like real weights.

The `tiny` model runs the whole stack (CLI, server, tests) fully offline. It has the real architecture
classes with toy sizes, so everything from `from_pretrained` down goes through the same code as the 14B
model; its output is noise. `tiny-two-expert` adds a `transformer_2` and `boundary_ratio` like Wan 2.2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vace_local.core.config import vace_settings

TINY_MODELS = ("tiny", "tiny-two-expert")
#: Bumped whenever the tiny recipe changes so stale cached copies are rebuilt.
TINY_VERSION = 1
BOUNDARY_RATIO = 0.875

_WORDS = (
    "a the cat dog video person walks runs in on of and with red blue green light dark city forest street "
    "night day camera slow fast moving boxing ring woman man smiles dances water sky"
).split()


def default_cache_dir() -> Path:
    """`VACE_CACHE_DIR` (default ~/.cache/vace-local)."""
    return vace_settings().cache_root


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


def _build_once(target: Path, marker: str, save: Callable[[Path], None]) -> Path:
    """`save(dir)` into a temporary directory renamed to `target`, unless `target/marker` exists already."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent builders race harmlessly
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_model(name: str = "tiny", cache_dir: Path | None = None) -> Path:
    """Build and save the tiny pipeline once (idempotent); return the directory to `from_pretrained`."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    target = (cache_dir or default_cache_dir()) / "tiny" / f"{name}-v{TINY_VERSION}"
    return _build_once(target, "model_index.json",
                       lambda d: build_tiny_pipeline(two_experts=name == "tiny-two-expert").save_pretrained(d))


# -- tiny helper models: the prompt expander and the safety classifier of `--model tiny` ------------------------

#: The model id of the tiny helpers (`VACE_SAFETY_MODEL=tiny`, `VACE_PROMPT_EXPANDER_MODEL=tiny`); a tiny engine
#: uses them in place of the default ids, so smoke mode runs both features end to end with no download.
TINY_HELPER = "tiny"
#: Bumped whenever a tiny helper recipe changes so stale cached copies are rebuilt.
TINY_HELPER_VERSION = 1
#: What the tiny expander answers, whatever the prompt: a controlled stand-in, visibly not the user's words.
TINY_EXPANSION = "TINY EXPANDER REWRITE: the camera pans slowly across a quiet scene in soft golden light"
#: The tiny safety classifier flags an image that is about half or more pure magenta, and nothing else.
TINY_SAFETY_MARKER = (255, 0, 255)


def helper_model_id(model_id: str, default_id: str, engine_is_tiny: bool) -> str:
    """The helper a job uses: a tiny engine runs the tiny helper where the default (unconfigured) id is set."""
    return TINY_HELPER if engine_is_tiny and model_id == default_id else model_id


def ensure_tiny_helper(kind: str, cache_dir: Path | None = None) -> Path:
    """Build the tiny `safety` classifier or `prompt-expander` LM once; return its transformers directory."""
    builders = {"safety": _save_tiny_classifier, "prompt-expander": _save_tiny_expander}
    target = (cache_dir or default_cache_dir()) / "tiny" / f"{kind}-v{TINY_HELPER_VERSION}"
    return _build_once(target, "config.json", builders[kind])


def _save_tiny_classifier(dest: Path) -> None:
    """A ResNet image classifier (labels normal / nsfw) wired by hand: its stem computes R + B - 2G per pixel
    (pixels scaled to -1..1, so 4 for pure magenta), less 3, rectified; average pooling gives the magenta share
    of the image; the head turns a share over one half into a confident "nsfw"."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    config = ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4], depths=[1], layer_type="basic",
                          hidden_act="relu", downsample_in_first_stage=False, num_labels=2,
                          id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the stage's residual branch included: it passes the stem's features through unchanged
        stem = model.resnet.embedder.embedder
        stem.convolution.weight[0, :, 3, 3] = torch.tensor([1.0, -2.0, 1.0])
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
        stem.normalization.weight.fill_(1.0)
        stem.normalization.running_mean[0] = 3.0
        model.classifier[1].weight[1, 0] = 20.0
        model.classifier[1].bias[1] = -10.0
    model.save_pretrained(dest)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(dest)


def _save_tiny_expander(dest: Path) -> None:
    """A Qwen2 causal LM with a byte-level BPE tokenizer and a chat template that always answers TINY_EXPANSION:
    its layers add nothing (zero output projections), so each position sees only its own token, and the head
    maps each token of the answer (after the template's last token) to the next one, then to the end token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_EXPANSION, "system user assistant"], trainer=trainer)
    reply_start = "<|im_start|>assistant\n"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}" + reply_start + "{% endif %}")
    fast.save_pretrained(dest)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    config.save_pretrained(dest)
    loaded = AutoTokenizer.from_pretrained(dest)  # the tokenizer class the expander will load, with its own rules

    def encode(text: str) -> list[int]:
        return loaded(text, add_special_tokens=False)["input_ids"]

    prompt_end, full = encode(reply_start), encode(reply_start + TINY_EXPANSION)
    chain = [prompt_end[-1], *full[len(prompt_end):], loaded.eos_token_id]
    if full[:len(prompt_end)] != prompt_end or len(set(chain)) != len(chain):
        raise RuntimeError(f"tiny expander: the answer's tokens {chain} do not form one unambiguous chain")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (m for name, m in model.named_modules() if name.endswith("norm")):
            norm.weight.fill_(1.0)
        for i, (tid, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
            model.model.embed_tokens.weight[tid, i] = 1.0
            model.lm_head.weight[nxt, i] = 1.0
    model.save_pretrained(dest)
