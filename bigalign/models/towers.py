"""The contrastive model: named towers, each projected into one shared embedding space.

Every modality (`image`, `text`, ...) has an encoder (a ViT, a text Transformer,
...) followed by a bias-free linear projection to `embed_dim` and L2
normalisation. The model also owns the learnable logit scale (stored as its log,
so it stays positive) and bias (SigLIP) that the loss uses.

Parameters are laid out as {modality: {"encoder", "projection"}, "logit_scale",
"logit_bias"}, so one tower can be locked or swapped by its name.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from bigalign.models.text import TextTransformer
from bigalign.models.vit import VisionTransformer

ENCODERS = {"vit": VisionTransformer, "text": TextTransformer}


class Tower(nn.Module):
    """One modality: encoder -> linear projection -> unit-length embedding [B, embed_dim]."""

    kind: str
    encoder_kwargs: Mapping[str, Any]
    embed_dim: int

    @nn.compact
    def __call__(self, inputs, *, deterministic: bool = True):
        encoder = ENCODERS[self.kind](**self.encoder_kwargs, name="encoder")
        features = encoder(inputs, deterministic=deterministic)
        embeddings = nn.Dense(self.embed_dim, use_bias=False, name="projection")(features)
        embeddings = embeddings.astype(jnp.float32)
        return embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True).clip(1e-6)


class ContrastiveModel(nn.Module):
    """Maps {modality: inputs} to {modality: embeddings} plus the logit scale and bias.

    Only the modalities present in `inputs` are run, so evaluation can embed
    images and texts separately with the same parameters.
    """

    towers: Mapping[str, Mapping[str, Any]]  # modality -> {"kind": ..., encoder kwargs}
    embed_dim: int
    init_logit_scale: float  # log of the initial scale
    init_logit_bias: float = 0.0

    @nn.compact
    def __call__(self, inputs: Mapping[str, jnp.ndarray], *, deterministic: bool = True):
        embeddings = {}
        for modality, tower in self.towers.items():
            kwargs = {k: v for k, v in tower.items() if k != "kind"}
            module = Tower(tower["kind"], kwargs, self.embed_dim, name=modality)
            if modality in inputs:
                embeddings[modality] = module(inputs[modality], deterministic=deterministic)
        log_scale = self.param(
            "logit_scale", nn.initializers.constant(self.init_logit_scale), (), jnp.float32
        )
        bias = self.param(
            "logit_bias", nn.initializers.constant(self.init_logit_bias), (), jnp.float32
        )
        return {"embeddings": embeddings, "logit_scale": jnp.exp(log_scale), "logit_bias": bias}


def build_model(model_config, *, vocab_size: int, max_len: int) -> ContrastiveModel:
    """The model described by `config.model`; the text tower gets the tokenizer's vocabulary."""
    towers = {}
    for modality in ("image", "text"):
        tower = dict(model_config[modality].to_dict())
        tower["dropout_rate"] = model_config.dropout_rate
        if tower["kind"] == "text":
            tower.update(vocab_size=vocab_size, max_len=max_len)
        towers[modality] = tower
    return ContrastiveModel(
        towers=towers,
        embed_dim=model_config.embed_dim,
        init_logit_scale=model_config.init_logit_scale,
        init_logit_bias=model_config.init_logit_bias,
    )
