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
from bigalign.models import audio, text, towers, transformer, vit


TOWER_KINDS = ("vit", "text", "audio")
POOLINGS = {"vit": vit.POOLINGS, "text": text.POOLINGS, "audio": audio.POOLINGS}


def tower_config(kind: str, **overrides) -> ml_collections.ConfigDict:
    """Every key a tower of `kind` ("vit", "text" or "audio") understands, with small defaults.

    Add a tower to a model with `config.model.<name> = tower_config(kind, ...)`; any
    sub-dict of `config.model` with a `kind` key is a tower, named by its key.
    """
    tower = dict(
        kind=kind,
        variant="",  # a named size ("B/16", "So400m/14"; text: "B"): sets the sizes below
        width=64,
        depth=2,
        num_heads=2,
        mlp_dim=256,
        frozen=False,  # LiT: no gradient and no optimizer state for this tower
        init_from="",  # a bigalign workdir (or checkpoint step dir) to load this tower from
    )
    if kind in ("vit", "audio"):
        tower.update(patch_size=4, pool="gap")  # square patches of the image / spectrogram
    if kind == "text":
        tower.update(causal=True, pool="last")
    for key in overrides:
        if key not in tower:
            raise UserError(f"tower_config: {kind} towers have no key {key!r}; valid: {sorted(tower)}")
    return ml_collections.ConfigDict({**tower, **overrides})


def base_config() -> ml_collections.ConfigDict:
    """Every key bigalign understands, with defaults for a small model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, across all devices and processes
    c.total_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    # A step with a non-finite loss or gradient is skipped (no update); this many in a row
    # stop the run, leaving the last checkpoint as it was.
    c.max_consecutive_nonfinite = 10

    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=100,
            end_learning_rate_fraction=0.0,  # cosine decays to this fraction of the peak
            b1=0.9,
            b2=0.95,
            weight_decay=1e-4,  # applied to kernels and the token table only
            grad_clip_norm=1.0,
        )
    )
    # The batch is split over data x fsdp devices; parameters over fsdp. -1: all the rest.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
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
            compute_dtype="float32",  # "bfloat16": bf16 matmuls, float32 master weights
            remat="none",  # recompute activations in the backward pass: none, full, dots, ...
            scan_layers=False,  # lax.scan over blocks: faster compiles, stacked params
            image=tower_config("vit"),
            text=tower_config("text"),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            name="sigmoid",
            # Towers whose embeddings are contrasted; the loss is the sum over these pairs.
            pairs=(("image", "text"),),
            alignment_weight=0.0,  # weight of mean ||x_i - y_i||^2, per pair
            uniformity_weight=0.0,  # weight of the mean of a pair's two uniformities
        )
    )
    # GradCache: embed the batch in num_chunks pieces and recompute each one's forward in the
    # backward pass; same gradients, tower activation memory / num_chunks. 1: off.
    c.grad_cache = ml_collections.ConfigDict(dict(num_chunks=1))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250, recall_at=(1, 5)))
    return c


def sized_config(variant: str, *, batch_size: int, image_size: int, max_len: int,
                 vocab_size: int, embed_dim: int) -> ml_collections.ConfigDict:
    """base_config with an image tower of a named size ("B/16") and a text tower of the
    same size ("B"), for benchmarks and scaling experiments on random inputs."""
    config = base_config()
    config.batch_size = batch_size
    config.data.image_size = image_size
    config.text.update(max_len=max_len, vocab_size=vocab_size)
    config.model.embed_dim = embed_dim
    config.model.image.variant = variant
    config.model.text.variant = variant.partition("/")[0]
    return config


def _unknown_keys(config, schema, prefix=""):
    """Yields (dotted key, close valid names) for keys of `config` absent from `schema`.

    A tower (a sub-dict of `model` with a `kind`) is checked against its kind's schema.
    """
    for key in config.keys():
        dotted, value = f"{prefix}{key}", config[key]
        if prefix == "model." and towers.is_tower(value):
            if value.kind in TOWER_KINDS:
                yield from _unknown_keys(value, tower_config(value.kind), prefix=f"{dotted}.")
        elif key not in schema:
            yield dotted, difflib.get_close_matches(key, list(schema.keys()), n=1)
        elif isinstance(schema[key], ml_collections.ConfigDict) and isinstance(
            value, ml_collections.ConfigDict
        ):
            yield from _unknown_keys(value, schema[key], prefix=f"{dotted}.")


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
        config.max_consecutive_nonfinite >= 1,
        f"max_consecutive_nonfinite={config.max_consecutive_nonfinite} must be at least 1",
    )
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
    pipeline.validate(config.data)
    _validate_model(config, require, fsdp=sharding.mesh_shape(config.mesh)[1])
    _validate_pairs(config, require)


def _validate_model(config, require, *, fsdp: int) -> None:
    model = config.model
    require(
        model.compute_dtype in towers.COMPUTE_DTYPES,
        f"model.compute_dtype={model.compute_dtype!r} is unknown; "
        f"valid: {', '.join(towers.COMPUTE_DTYPES)}",
    )
    require(
        model.remat in transformer.REMAT_POLICIES,
        f"model.remat={model.remat!r} is unknown; valid: {', '.join(transformer.REMAT_POLICIES)}",
    )
    names = towers.tower_names(config.model)
    require(len(names) >= 2, f"model has towers {names}; a contrastive model needs at least two")
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    for name in names:
        kind = model[name].kind
        require(
            kind in TOWER_KINDS, f"model.{name}.kind={kind!r} is unknown; valid: {', '.join(TOWER_KINDS)}"
        )
        require(
            name in shapes,
            f"model.{name} is a tower, but the data has no {name!r} inputs; name each tower "
            f"after the modality it reads: {', '.join(shapes)}",
        )
    try:
        resolved = towers.resolve_towers(model, vocab_size=config.text.vocab_size, max_len=config.text.max_len)
    except ValueError as error:  # an unknown variant name
        raise UserError(str(error)) from None
    for name, tower in resolved.items():
        key = f"model.{name}"
        require(
            tower["width"] % tower["num_heads"] == 0,
            f"{key}.width={tower['width']} is not divisible by num_heads={tower['num_heads']}; "
            f"pick a width that is a multiple of num_heads",
        )
        require(
            tower["width"] % fsdp == 0,
            f"{key}.width={tower['width']} is not divisible by mesh.fsdp={fsdp}, over which "
            f"parameters are split; pick an fsdp size that divides it",
        )
        poolings = POOLINGS[tower["kind"]]
        require(
            tower["pool"] in poolings, f"{key}.pool={tower['pool']!r} is unknown; valid: {', '.join(poolings)}"
        )
        if "patch_size" in tower:
            patch, input_size = tower["patch_size"], shapes[name][:2]
            require(
                all(size % patch == 0 for size in input_size),
                f"{key}.patch_size={patch} does not divide the {name} input size {input_size} "
                f"set in config.data; pick a patch size that divides both sides",
            )


def _validate_pairs(config, require) -> None:
    names = towers.tower_names(config.model)
    pairs = config.loss.pairs
    require(len(pairs) >= 1, "loss.pairs is empty; name at least one pair of towers to contrast")
    for pair in pairs:
        require(
            len(pair) == 2 and pair[0] != pair[1] and all(m in names for m in pair),
            f"loss.pairs has {tuple(pair)!r}; each pair must name two different towers of {names}",
        )
    unused = [m for m in names if not any(m in pair for pair in pairs)]
    require(
        not unused,
        f"tower(s) {unused} appear in no loss.pairs entry and would never train; add a pair "
        f"or remove the tower",
    )
