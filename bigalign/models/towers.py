"""The contrastive model: named towers, each projected into one shared embedding space.

Every modality (`image`, `text`, `audio`, ...) has an encoder (a ViT, a text
Transformer, an audio Transformer) followed by a linear projection to `embed_dim`
(bias-free as in CLIP, or with a bias as SigLIP's text head: `projection_bias`; or
none, as SigLIP's image tower: `projection="none"`) and L2 normalisation. The model also owns the learnable logit scale (stored as its log, so
it stays positive; optionally capped, as open_clip caps it at 100) and bias (SigLIP)
that the loss uses.

Parameters are laid out as {modality: {"encoder", "projection"}, "logit_scale",
"logit_bias"}, so one tower can be locked or swapped by its name. Encoders come from
the tower-kind registry (`encoders.py`); each also returns its token sequence.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bigalign.models import vit, text, audio  # noqa: F401,I001  (registers the kinds in this order)
from bigalign.models import encoders
from bigalign.models.sizes import parse_variant
from bigalign.models.transformer import partitioned

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Tower(nn.Module):
    """One modality: encoder -> linear projection -> unit-length float32 embedding [B, embed_dim].

    Returns (embeddings [B, embed_dim], the encoder's tokens [B, T, width]).
    """

    kind: str
    encoder_kwargs: Mapping[str, Any]
    embed_dim: int
    projection: str = "linear"  # or "none": the features are the embedding (W = embed_dim)
    projection_bias: bool = False

    @nn.compact
    def __call__(self, inputs, *, deterministic: bool = True):
        encoder = encoders.get(self.kind).module(**self.encoder_kwargs, name="encoder")
        features, tokens = encoder(inputs, deterministic=deterministic)  # [B, W], [B, T, W]
        embeddings = features if self.projection == "none" else nn.Dense(
            self.embed_dim,
            use_bias=self.projection_bias,
            dtype=encoder.dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), "embed", "proj"),
            bias_init=partitioned(nn.initializers.zeros, "proj"),
            name="projection",
        )(features)
        embeddings = embeddings.astype(jnp.float32)  # normalise in float32 whatever the compute dtype
        return embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True).clip(1e-6), tokens


PROJECTION_KEYS = ("projection", "projection_bias")  # the Tower's own; the rest the encoder's


def tower_module(tower: Mapping[str, Any], embed_dim: int, name: str | None = None) -> Tower:
    """The Tower of one `resolve_towers` entry ({"kind", PROJECTION_KEYS, encoder kwargs})."""
    kwargs = {k: v for k, v in tower.items() if k not in ("kind", *PROJECTION_KEYS)}
    projection = {key: tower[key] for key in PROJECTION_KEYS if key in tower}
    return Tower(tower["kind"], kwargs, embed_dim, **projection, name=name)


class ContrastiveModel(nn.Module):
    """Maps {modality: inputs} to {"embeddings": {modality: [B, E]}, "tokens": {modality:
    [B, T, W]}, "logit_scale", "logit_bias"}.

    Only the modalities present in `inputs` are run, so evaluation can embed
    images and texts separately with the same parameters, and `apply(v, {})`
    returns just the scale and bias.
    """

    towers: Mapping[str, Mapping[str, Any]]  # modality -> {"kind": ..., encoder kwargs}
    embed_dim: int
    init_logit_scale: float  # log of the initial scale
    init_logit_bias: float = 0.0
    # > 0: the scale used is min(exp(logit_scale), max_logit_scale). open_clip clamps the
    # parameter itself after each step (at log 100); here the forward pass caps it, so
    # past the cap the scale gets no gradient: the same logits, the same loss.
    max_logit_scale: float = 0.0

    @nn.compact
    def __call__(self, inputs: Mapping[str, jnp.ndarray], *, deterministic: bool = True):
        embeddings, tokens = {}, {}
        for modality, tower in self.towers.items():
            module = tower_module(tower, self.embed_dim, name=modality)
            if modality in inputs:
                embeddings[modality], tokens[modality] = module(
                    inputs[modality], deterministic=deterministic
                )
        log_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(self.init_logit_scale)), (), jnp.float32
        )
        bias = self.param(
            "logit_bias", partitioned(nn.initializers.constant(self.init_logit_bias)), (), jnp.float32
        )
        return {"embeddings": embeddings, "tokens": tokens,
                "logit_scale": capped_scale(log_scale, self.max_logit_scale), "logit_bias": bias}


def capped_scale(log_scale, max_logit_scale: float):
    """exp(log_scale), at most `max_logit_scale` when that is > 0 (open_clip: 100)."""
    if max_logit_scale > 0:
        log_scale = jnp.minimum(log_scale, jnp.log(max_logit_scale))
    return jnp.exp(log_scale)


def is_tower(value) -> bool:
    """Whether a `config.model` entry describes a tower: a sub-ConfigDict with a "kind"."""
    return isinstance(value, ml_collections.ConfigDict) and "kind" in value


def tower_names(model_config: ml_collections.ConfigDict) -> list[str]:
    """The towers of `config.model`, in the config's key order (ConfigDict sorts keys by name)."""
    return [name for name, value in model_config.items() if is_tower(value)]


def resolve_towers(
    model_config: ml_collections.ConfigDict, *, vocab_size: int, max_len: int
) -> dict[str, dict]:
    """{modality: {"kind", encoder kwargs}} from `config.model`, ready for ContrastiveModel.

    A tower's non-empty `variant` ("B/16", "So400m/14", "B") replaces its width,
    depth, num_heads and mlp_dim, and its patch_size when it names one. Model-level
    dropout_rate, compute_dtype, remat and scan_layers apply to every tower; a kind
    that asks for them (text) also gets the tokenizer's vocabulary size and the maximum
    length. PROJECTION_KEYS are kept for the Tower; the other keys that are not encoder
    arguments (frozen, init_from, variant) are dropped.
    """
    if model_config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"unknown model.compute_dtype {model_config.compute_dtype!r}; use one of {tuple(COMPUTE_DTYPES)}"
        )
    towers = {}
    for name in tower_names(model_config):
        tower = model_config[name]
        kind = encoders.get(tower.kind, f"model.{name}.kind")
        argument_keys = encoders.ENCODER_ARGUMENTS + tuple(kind.options)
        kwargs = {key: tower[key] for key in argument_keys if key in tower}
        if tower.get("variant"):
            dims, patch_size = parse_variant(tower.variant)
            kwargs.update(dims)
            if patch_size is not None and "patch_size" in kind.options:
                kwargs["patch_size"] = patch_size
        kwargs.update(
            dropout_rate=model_config.dropout_rate,
            dtype=COMPUTE_DTYPES[model_config.compute_dtype],
            remat=model_config.remat,
            scan_layers=model_config.scan_layers,
        )
        context = dict(vocab_size=vocab_size, max_len=max_len)
        kwargs.update({key: context[key] for key in kind.context})
        towers[name] = {"kind": tower.kind, **{key: tower[key] for key in PROJECTION_KEYS}, **kwargs}
    return towers


def build_model(
    model_config: ml_collections.ConfigDict, *, vocab_size: int, max_len: int
) -> ContrastiveModel:
    """The model described by `config.model`; text towers get the tokenizer's vocabulary."""
    return ContrastiveModel(
        towers=resolve_towers(model_config, vocab_size=vocab_size, max_len=max_len),
        embed_dim=model_config.embed_dim,
        init_logit_scale=model_config.init_logit_scale,
        init_logit_bias=model_config.init_logit_bias,
        max_logit_scale=model_config.max_logit_scale,
    )
