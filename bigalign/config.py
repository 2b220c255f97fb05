"""Configuration: the full schema with defaults, and validation before anything compiles.

Config files in `configs/` start from `base_config()` and change values; they
may not add keys. `validate` checks the whole config once, up front, and raises
`UserError` with a one-line message naming the key and the fix.
"""

import difflib
import math

import ml_collections

from bigalign import losses, sharding
from bigalign.data import pipeline
from bigalign.errors import UserError
from bigalign.models import text, towers, vit


def base_config() -> ml_collections.ConfigDict:
    """Every key bigalign understands, with defaults for a small model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, across all devices and processes
    c.total_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3

    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=100,
            end_learning_rate_fraction=0.0,  # cosine decays to this fraction of the peak
            b1=0.9,
            b2=0.95,
            weight_decay=1e-4,  # applied to matrices only (kernels, embeddings)
            grad_clip_norm=1.0,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1))  # -1: all devices
    c.data = pipeline.default_config()
    c.text = ml_collections.ConfigDict(
        dict(
            max_len=16,
            vocab_size=128,  # whole-word pieces: every demo caption fits in 11 tokens
            tokenizer="",  # a sentencepiece .model path; "" trains WORKDIR/tokenizer.model
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            embed_dim=64,
            dropout_rate=0.0,
            init_logit_scale=math.log(10.0),  # log of the initial scale (SigLIP: log 10)
            init_logit_bias=-10.0,  # SigLIP: -10; softmax losses ignore the bias
            image=dict(
                kind="vit", patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=256, pool="gap"
            ),
            text=dict(
                kind="text", width=64, depth=2, num_heads=2, mlp_dim=256, causal=True, pool="last"
            ),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            name="sigmoid",
            alignment_weight=0.0,  # weight of mean ||image_i - text_i||^2
            uniformity_weight=0.0,  # weight of the mean of the two modalities' uniformity
        )
    )
    # GradCache: embed the batch in num_chunks pieces and recompute each one's forward in the
    # backward pass; same gradients, tower activation memory / num_chunks. 1: off.
    c.grad_cache = ml_collections.ConfigDict(dict(num_chunks=1))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250, recall_at=(1, 5)))
    return c


def _unknown_keys(config, schema, prefix=""):
    """Yields (dotted key, close valid names) for keys of `config` absent from `schema`."""
    for key in config.keys():
        dotted = f"{prefix}{key}"
        if key not in schema:
            yield dotted, difflib.get_close_matches(key, list(schema.keys()), n=1)
        elif isinstance(schema[key], ml_collections.ConfigDict) and isinstance(
            config[key], ml_collections.ConfigDict
        ):
            yield from _unknown_keys(config[key], schema[key], prefix=f"{dotted}.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises UserError (one line: the key and the fix) for the first problem found."""
    for dotted, close in _unknown_keys(config, base_config()):
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown config key {dotted!r}{hint} (valid keys: bigalign/config.py)")

    def require(ok, message):
        if not ok:
            raise UserError(message)

    require(config.total_steps > 0, "total_steps must be positive")
    require(
        0 <= config.optimizer.warmup_steps <= config.total_steps,
        f"optimizer.warmup_steps={config.optimizer.warmup_steps} must lie in "
        f"[0, total_steps={config.total_steps}]",
    )
    num_shards = sharding.num_data_shards(config.mesh)
    require(
        config.batch_size > 0 and config.batch_size % num_shards == 0,
        f"batch_size={config.batch_size} is not divisible by the {num_shards} data shards; "
        f"use a multiple of {num_shards}",
    )
    chunks, per_device = config.grad_cache.num_chunks, config.batch_size // num_shards
    require(
        isinstance(chunks, int) and chunks >= 1 and per_device % chunks == 0,
        f"grad_cache.num_chunks={chunks} must be a positive divisor of the per-device batch "
        f"{per_device} (batch_size={config.batch_size} over {num_shards} data shards); "
        f"pick a divisor of {per_device}, or 1 to turn GradCache off",
    )
    require(
        config.loss.name in losses.NAMES,
        f"unknown loss.name {config.loss.name!r}; valid: {', '.join(losses.NAMES)}",
    )
    for modality, poolings in (("image", vit.POOLINGS), ("text", text.POOLINGS)):
        tower = config.model[modality]
        require(
            tower.kind in towers.ENCODERS,
            f"model.{modality}.kind={tower.kind!r} is unknown; valid: {', '.join(towers.ENCODERS)}",
        )
        require(
            tower.width % tower.num_heads == 0,
            f"model.{modality}.width={tower.width} is not divisible by "
            f"num_heads={tower.num_heads}; pick a width that is a multiple of num_heads",
        )
        require(
            tower.pool in poolings,
            f"model.{modality}.pool={tower.pool!r} is unknown; valid: {', '.join(poolings)}",
        )
    patch = config.model.image.patch_size
    require(
        config.data.image_size % patch == 0,
        f"data.image_size={config.data.image_size} is not divisible by "
        f"model.image.patch_size={patch}",
    )
