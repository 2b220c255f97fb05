"""The pre-LayerNorm Transformer encoder shared by every tower.

One block is: x + Attention(LN(x)), then x + MLP(LN(x)) (Xiong et al., 2020),
the layout ViT, CLIP and SigLIP all use. Towers differ only in how tokens
come in (patches, words, spectrogram patches) and how they are pooled.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


class MlpBlock(nn.Module):
    """Two dense layers with a GELU between them."""

    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, name="fc1")(x)
        x = nn.gelu(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return nn.Dense(width, name="fc2")(x)


class EncoderBlock(nn.Module):
    """One pre-LN Transformer block: self-attention then MLP, each residual."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, mask: Optional[jnp.ndarray], *, deterministic: bool):
        # x: [B, T, W]; mask: [B, 1, T, T] booleans (True = may attend) or None.
        y = nn.LayerNorm(name="ln_attention")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(
            y, y, mask=mask, deterministic=True
        )
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = x + y
        y = nn.LayerNorm(name="ln_mlp")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp")(y, deterministic=deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return x + y


class Encoder(nn.Module):
    """A stack of `depth` encoder blocks followed by a final LayerNorm."""

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, mask=None, *, deterministic: bool = True):
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate, name=f"block{i}"
            )(x, mask, deterministic=deterministic)
        return nn.LayerNorm(name="ln_final")(x)


class AttentionPool(nn.Module):
    """Multihead attention pooling ("MAP", Lee et al. 2019): a learned query attends over tokens."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask=None):
        # x: [B, T, W] -> [B, W]; mask: [B, 1, 1, T] or None.
        batch, _, width = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
        probe = jnp.broadcast_to(probe, (batch, 1, width)).astype(x.dtype)
        pooled = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(
            probe, x, mask=mask
        )
        y = nn.LayerNorm(name="ln")(pooled)
        pooled = pooled + MlpBlock(self.mlp_dim, name="mlp")(y, deterministic=True)
        return pooled[:, 0]
