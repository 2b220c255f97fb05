"""Vision Transformer image tower (Dosovitskiy et al., 2021), the patch encoder audio reuses.

image [B, H, W, C] -> non-overlapping patches -> linear embedding + learned
positions -> pre-LN Transformer -> tokens [B, T, width] -> one vector per image [B, width], pooled by
`gap` (mean of patch tokens), `cls` (a prepended class token) or `map`
(attention pooling, as in SigLIP). Nothing here is specific to photographs:
`audio.AudioTransformer` runs the same module on spectrograms.

Patch dropout (FLIP, Li et al. 2023; open_clip's `patch_dropout`): in training, each
example keeps a random `1 - patch_dropout` fraction of its patch tokens (after the
position embedding, so each kept token still knows where it came from); evaluation
sees them all. At 0.5 the Transformer runs on half the tokens: about twice the
images per second, at a small cost in accuracy that a short unmasked tuning recovers.
"""

from typing import Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigalign.models.encoders import ENCODERS, TRANSFORMER_OPTIONS, EncoderKind, EncoderOutput
from bigalign.models.transformer import Dtype, layer_norm, map_head, partitioned, tower_encoder
from bigalign.schema import Integer, Key, Number, OneOf

POOLINGS = ("gap", "cls", "map")

# How uint8 pixels become the network's input, as each source trained: (mean, std) per
# channel of x / 255. "unit": [-1, 1] (big_vision, SigLIP); "clip": OpenAI CLIP's
# statistics (open_clip's OPENAI_DATASET_MEAN / _STD, used by every CLIP it ships).
PIXEL_NORMS = {
    "unit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def kept_patches(count: int, rate: float) -> int:
    """How many of `count` patches an example keeps when a `rate` fraction is dropped."""
    return max(1, round(count * (1 - rate)))


def drop_patches(tokens, rate: float, rng):
    """A random kept_patches(T, rate) of each example's tokens [B, T, W], in their order."""
    batch, count, _ = tokens.shape
    scores = jax.random.uniform(rng, (batch, count))
    kept = jnp.sort(jax.lax.top_k(scores, kept_patches(count, rate))[1], axis=1)
    return jnp.take_along_axis(tokens, kept[:, :, None], axis=1)


def normalise_pixels(pixels, norm: str = "unit"):
    """uint8 [..., H, W, C] -> float32 (x / 255 - mean) / std, with PIXEL_NORMS[norm]
    per channel ("unit": [-1, 1]). One multiply-add per pixel, on the device."""
    mean, std = (jnp.asarray(stat, jnp.float32)[: pixels.shape[-1]] for stat in PIXEL_NORMS[norm])
    return pixels.astype(jnp.float32) * (1 / (255 * std)) - mean / std


class VisionTransformer(nn.Module):
    """A patch encoder over [B, H, W, C]; `patch_size` is an int (square) or (rows, cols)."""

    patch_size: Union[int, tuple[int, int]]
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "gap"
    patch_dropout: float = 0.0  # fraction of patch tokens dropped per example in training
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-6
    ln_pre: bool = False  # a LayerNorm before the Transformer (OpenAI CLIP)
    patch_bias: bool = True  # open_clip's patch embedding has none
    pixel_norm: str = "unit"  # a PIXEL_NORMS key

    def as_image(self, inputs):
        """The [B, H, W, C] grid to cut into patches; subclasses adapt other inputs.

        uint8 pixels (as the input pipeline sends them: a quarter of float32's bytes
        host-to-device) are normalised here by `pixel_norm`; float inputs are taken as
        they are.
        """
        return normalise_pixels(inputs, self.pixel_norm) if inputs.dtype == jnp.uint8 else inputs

    @nn.compact
    def __call__(self, inputs, *, deterministic: bool = True):
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pool!r}; use one of {POOLINGS}")
        patch = (self.patch_size,) * 2 if isinstance(self.patch_size, int) else tuple(self.patch_size)
        x = nn.Conv(
            self.width,
            patch,
            strides=patch,
            padding="VALID",
            use_bias=self.patch_bias,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), None, None, None, "embed"),
            bias_init=partitioned(nn.initializers.zeros, "embed"),
            name="patch_embed",
        )(self.as_image(inputs))
        batch, rows, cols, width = x.shape
        x = x.reshape(batch, rows * cols, width)  # [B, T, W]
        positions = self.param(
            "position_embedding",
            partitioned(nn.initializers.normal(stddev=0.02), None, None, "embed"),
            (1, rows * cols, width),
        )
        x = x + positions.astype(self.dtype)
        if self.patch_dropout and not deterministic:
            x = drop_patches(x, self.patch_dropout, self.make_rng("dropout"))
        if self.pool == "cls":
            cls = self.param(
                "cls_token", partitioned(nn.initializers.zeros, None, None, "embed"), (1, 1, width)
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)
        if self.ln_pre:
            x = layer_norm(self.dtype, "ln_pre", self.layer_norm_epsilon)(x)
        x = tower_encoder(self)(x, deterministic=deterministic)  # [B, T, W]
        if self.pool == "cls":
            return EncoderOutput(x[:, 0], x)
        if self.pool == "map":
            pooled = map_head(self)(x)
            return EncoderOutput(pooled, x)
        return EncoderOutput(x.mean(axis=1), x)


def patch_embedding_flops(tower, input_shape, channels: int = 3) -> tuple[int, int]:
    """(multiply-adds of the patch embedding, tokens) for one [rows, cols(, channels)] input."""
    rows, cols = input_shape[:2]
    patch = tower["patch_size"]
    patch_rows, patch_cols = (patch, patch) if isinstance(patch, int) else patch
    patches = (rows // patch_rows) * (cols // patch_cols)
    macs = patches * patch_rows * patch_cols * channels * tower["width"]
    kept = kept_patches(patches, tower.get("patch_dropout", 0.0))  # in training
    return macs, kept + (tower["pool"] == "cls")


ENCODERS.register("vit", EncoderKind(
    VisionTransformer,
    options=dict(**TRANSFORMER_OPTIONS, patch_size=Key(4, Integer(low=1)), pool="gap",
                 patch_dropout=Key(0.0, Number(low=0, below=1)),  # FLIP; 0.5 halves the tokens
                 ln_pre=False, patch_bias=True,
                 pixel_norm=Key("unit", OneOf(tuple(PIXEL_NORMS)))),
    poolings=POOLINGS, embedding_flops=patch_embedding_flops,
))
