"""Transformer text tower (as in CLIP).

token ids [B, L] (0 = padding) -> token embedding + learned positions ->
pre-LN Transformer (causal or bidirectional; with `mask_padding`, the padding after
each text's tokens is never attended to) -> tokens [B, L, width] -> one vector per
text [B, width], pooled at the last real token (`last`: the EOS token the tokenizer
appends, as open_clip's argmax pooling finds it), the first token (`first`), the
final position whatever it holds (`final`: big_vision's "last", for SigLIP), or by
attention pooling (`map`).

A text's length is the position after its last non-padding token, not the count of
non-padding tokens: CLIP's BPE gives "!" id 0, the padding id, inside a text.
"""

import flax.linen as nn
import jax.numpy as jnp

from bigalign.models.encoders import ENCODERS, TRANSFORMER_OPTIONS, EncoderKind, EncoderOutput
from bigalign.models.transformer import Dtype, map_head, partitioned, tower_encoder

POOLINGS = ("last", "first", "final", "map")
PAD_ID = 0


def text_lengths(tokens):
    """[B]: the position after each row's last non-padding token (0 for all padding)."""
    positions = jnp.arange(1, tokens.shape[1] + 1)
    return jnp.max(jnp.where(tokens != PAD_ID, positions, 0), axis=1)


class TextTransformer(nn.Module):
    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    pool: str = "last"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-6
    # False: padding is attended to like any token (SigLIP's text tower, whose padding
    # id is a real token of its vocabulary).
    mask_padding: bool = True

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True):
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown text pooling {self.pool!r}; use one of {POOLINGS}")
        batch, length = tokens.shape
        x = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            embedding_init=partitioned(nn.linear.default_embed_init, "vocab", "embed"),
            name="token_embed",
        )(tokens)  # [B, L, W]
        positions = self.param(
            "position_embedding",
            partitioned(nn.initializers.normal(stddev=0.01), None, None, "embed"),
            (1, self.max_len, self.width),
        )
        x = x + positions[:, :length].astype(self.dtype)
        lengths = text_lengths(tokens)  # [B]
        key_lengths = lengths if self.mask_padding else None
        x = tower_encoder(self)(x, key_lengths, deterministic=deterministic)  # [B, L, W]
        if self.pool == "first":
            return EncoderOutput(x[:, 0], x)
        if self.pool == "final":
            return EncoderOutput(x[:, -1], x)
        if self.pool == "map":
            return EncoderOutput(map_head(self)(x, key_lengths), x)
        last = jnp.maximum(lengths - 1, 0)  # index of the EOS token, [B]
        return EncoderOutput(x[jnp.arange(batch), last], x)


ENCODERS.register("text", EncoderKind(
    TextTransformer, options=dict(**TRANSFORMER_OPTIONS, causal=True, pool="last", mask_padding=True),
    poolings=POOLINGS,
    embedding_flops=lambda tower, shape: (0, shape[0]),  # a table lookup: no multiply-adds
    context=("vocab_size", "max_len"),
))
