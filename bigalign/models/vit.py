"""Vision Transformer image tower (Dosovitskiy et al., 2021).

image [B, H, W, 3] -> non-overlapping patches -> linear embedding + learned
positions -> pre-LN Transformer -> one vector per image [B, width], pooled by
`gap` (mean of patch tokens), `cls` (a prepended class token) or `map`
(attention pooling, as in SigLIP).
"""

import flax.linen as nn
import jax.numpy as jnp

from bigalign.models.transformer import AttentionPool, Encoder

POOLINGS = ("gap", "cls", "map")


class VisionTransformer(nn.Module):
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images, *, deterministic: bool = True):
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown image pooling {self.pool!r}; use one of {POOLINGS}")
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(images)
        batch, rows, cols, width = x.shape
        x = x.reshape(batch, rows * cols, width)  # [B, T, W]
        positions = self.param(
            "position_embedding", nn.initializers.normal(stddev=0.02), (1, rows * cols, width)
        )
        x = x + positions
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout_rate, name="encoder")(
            x, deterministic=deterministic
        )
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "map":
            return AttentionPool(self.num_heads, self.mlp_dim, name="map_head")(x)
        return x.mean(axis=1)
