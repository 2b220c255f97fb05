"""Transformer text tower (as in CLIP).

token ids [B, L] (0 = padding) -> token embedding + learned positions ->
pre-LN Transformer (causal or bidirectional; the padding after each text's tokens is
never attended to) -> tokens
[B, L, width] -> one vector per text [B, width], pooled at the last real token (`last`, the EOS
token the tokenizer appends), the first token (`first`), or by attention
pooling (`map`).
"""

import flax.linen as nn
import jax.numpy as jnp

from bigalign.models.encoders import ENCODERS, EncoderKind, EncoderOutput
from bigalign.models.transformer import AttentionPool, Dtype, partitioned, tower_encoder

POOLINGS = ("last", "first", "map")
PAD_ID = 0


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

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True):
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown text pooling {self.pool!r}; use one of {POOLINGS}")
        batch, length = tokens.shape
        is_token = tokens != PAD_ID  # [B, L]
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
        lengths = is_token.sum(axis=1)  # [B]: the tokenizer pads at the end
        x = tower_encoder(self)(x, lengths, deterministic=deterministic)  # [B, L, W]
        if self.pool == "first":
            return EncoderOutput(x[:, 0], x)
        if self.pool == "map":
            pooled = AttentionPool(self.num_heads, self.mlp_dim, self.dtype, name="map_head")(
                x, lengths
            )
            return EncoderOutput(pooled, x)
        last = jnp.maximum(lengths - 1, 0)  # index of the EOS token, [B]
        return EncoderOutput(x[jnp.arange(batch), last], x)


ENCODERS.register("text", EncoderKind(
    TextTransformer, options=dict(causal=True, pool="last"), poolings=POOLINGS,
    embedding_flops=lambda tower, shape: (0, shape[0]),  # a table lookup: no multiply-adds
    context=("vocab_size", "max_len"),
))
