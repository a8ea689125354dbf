"""Analytic FLOP count of one Wan VACE transformer forward, from its config and the job's size.

The benchmark divides these FLOPs by measured seconds to report an effective TFLOP/s and the fraction of
the device's measured matmul peak. Only matmul-like work is counted (linear layers, the patch-embedding
convolutions, attention's two L×L products); norms, RoPE, activations and other elementwise work are
left out, as in the usual model-FLOPs convention (and as torch's FlopCounterMode counts).
One multiply-add is 2 FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from vace_local.core.spec import latent_tokens

#: Text is always padded to this many tokens by the pipeline (max_sequence_length).
TEXT_TOKENS = 512


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one transformer forward (batch 1), split by kind."""

    linear: float  # linear layers of main + VACE blocks (incl. the text k/v projections)
    attention: float  # the QKᵀ and PV products of self- and cross-attention
    embed: float  # patch embeddings, time and text embedders, output projection
    vace: float  # the part of linear+attention spent in VACE blocks (already included above)
    tokens: int

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.embed

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["total"] = self.total
        return d


def _cfg(config: Any) -> dict[str, Any]:
    return dict(config) if not hasattr(config, "to_dict") else config.to_dict()


def forward_flops(config: Any, tokens: int, text_tokens: int = TEXT_TOKENS) -> ForwardFlops:
    """FLOPs of one `WanVACETransformer3DModel.forward` with `tokens` latent tokens (batch 1)."""
    c = _cfg(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    ffn = c["ffn_dim"]
    n_main, n_vace = c["num_layers"], len(c["vace_layers"])
    patch = math.prod(c["patch_size"])
    L, S = tokens, text_tokens

    block_linear = (
        4 * 2 * L * d * d  # self-attention q, k, v, o
        + 2 * 2 * L * d * d  # cross-attention q, o
        + 2 * 2 * S * d * d  # cross-attention k, v on the text tokens
        + 2 * 2 * L * d * ffn  # feed-forward up and down
    )
    block_attn = 4 * L * L * d + 4 * L * S * d  # self (QKᵀ + PV) and cross attention
    vace_extra = 2 * L * d * d * n_vace + 2 * L * d * d  # after_proj on every VACE block, before_proj on block 0

    linear = (n_main + n_vace) * block_linear + vace_extra
    attention = (n_main + n_vace) * block_attn
    embed = (
        2 * L * c["in_channels"] * patch * d  # patch embedding (conv as matmul)
        + 2 * L * c["vace_in_channels"] * patch * d  # VACE patch embedding
        + 2 * (c["freq_dim"] * d + d * d) + 2 * 6 * d * d  # time embedder + time projection
        + 2 * S * (c["text_dim"] * d + d * d)  # text embedder
        + 2 * L * d * c["out_channels"] * patch  # output projection
    )
    vace = n_vace * (block_linear + block_attn) + vace_extra
    return ForwardFlops(float(linear), float(attention), float(embed), float(vace), L)


def step_flops(config: Any, width: int, height: int, num_frames: int, *, cfg: bool = True, num_refs: int = 0,
               text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one denoising step: one forward, or two with classifier-free guidance."""
    c = _cfg(config)
    L = latent_tokens(width, height, num_frames, tuple(c["patch_size"]), num_refs)
    return forward_flops(c, L, text_tokens).total * (2 if cfg else 1)
