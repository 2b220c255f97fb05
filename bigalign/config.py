"""Configuration: the full schema with defaults, and validation before anything compiles.

Config files in `configs/` start from `base_config()` and change values; they
may not add keys. `validate` checks the whole config once, up front, without
touching any device (a pod config validates on a laptop), and raises `UserError`
with a one-line message naming the key and the fix; `validate_on_mesh` checks the
rest against the devices once the mesh is made. `save` writes the config of a run
into its workdir, `load_saved` reads it back and `check_resume` compares the two.
"""

import difflib
import importlib
import json
import math

import ml_collections

from bigalign import evaluators, objectives, optimizer, schema as schema_lib, workdir as workdir_lib
from bigalign.data import pipeline, tokenizer_kinds
from bigalign.errors import UserError
from bigalign.models import encoders, towers, transformer
from bigalign.schema import Integer, Key, Number, OneOf, Path, Registered, Sequence, Text

SAVED_CONFIG = "config.json"  # in the workdir


def tower_schema(kind: str) -> dict:
    """Every key a tower of `kind` understands: defaults and constraints (schema.py)."""
    return {"kind": Key(kind, Registered(encoders.ENCODERS)), **encoders.SHARED_OPTIONS,
            **encoders.get(kind).options}


def tower_config(kind: str, **overrides) -> ml_collections.ConfigDict:
    """Every key a tower of `kind` ("vit", "text", "audio", or a registered kind)
    understands, with small defaults.

    Add a tower to a model with `config.model.<name> = tower_config(kind, ...)`; any
    sub-dict of `config.model` with a `kind` key is a tower, named by its key.
    """
    return schema_lib.defaults_with(tower_schema(kind), overrides, f"tower_config: {kind} towers")


def schema() -> dict:
    """Every key bigalign understands: its default for a small model and the values it
    accepts (schema.py). Configs start from `base_config()`, these defaults."""
    return dict(
        # Modules to import before the run is built: extensions that register a loss, tower
        # kind, modality, evaluator or data source, so a saved config rebuilds the run.
        imports=Key((), Sequence(Text(nonempty=True))),
        seed=0,
        batch_size=Key(256, Integer(low=1)),  # global, across all devices and processes
        total_steps=Key(1000, Integer(low=1)),
        log_every=Key(50, Integer(low=1)),
        checkpoint_every=Key(500, Integer(low=1)),
        keep_checkpoints=Key(3, Integer(low=1)),
        # A step with a non-finite loss or gradient is skipped (no update); this many in a
        # row stop the run, leaving the last checkpoint as it was.
        max_consecutive_nonfinite=Key(10, Integer(low=1)),
        # With several processes, whether any got a stop signal (SIGTERM, Ctrl-C) is agreed
        # every this many steps (a host-blocking collective); one process checks every step.
        stop_check_every=Key(10, Integer(low=1)),
        optimizer=dict(
            learning_rate=Key(1e-3, Number(above=0)),
            warmup_steps=Key(100, Integer(low=0)),
            # Cosine decays to this fraction of the peak.
            end_learning_rate_fraction=Key(0.0, Number(low=0, high=1)),
            b1=Key(0.9, Number(low=0, below=1)),
            b2=Key(0.95, Number(low=0, below=1)),
            eps=Key(1e-8, Number(above=0)),  # Adam's epsilon (optax's default; CLIP: 1e-6)
            weight_decay=Key(1e-4, Number(low=0)),
            # What weight_decay means (optimizer.py): "optax" decays by wd x lr(t) (AdamW,
            # open_clip), "big_vision" by wd x lr(t) / learning_rate (big_vision/optax.py).
            weight_decay_mode=Key("optax", OneOf(optimizer.WEIGHT_DECAY_MODES)),
            # Which parameters decay: "kernels_and_embeddings" (weights and the token
            # table), "kernels" (big_vision), "all_but_gains_and_biases" (open_clip).
            weight_decay_mask=Key("kernels_and_embeddings",
                                  OneOf(tuple(optimizer.WEIGHT_DECAY_MASKS))),
            grad_clip_norm=Key(1.0, Number(low=0)),  # global norm; 0: no clipping (open_clip)
        ),
        # The batch is split over data x fsdp devices; parameters over fsdp. -1: all the rest.
        mesh=dict(data=Key(-1, Integer(low=-1)), fsdp=Key(1, Integer(low=1))),
        data=pipeline.schema(),
        text=dict(
            max_len=Key(16, Integer(low=2)),  # at least one token and the EOS
            # Whole-word pieces: every demo caption fits in 11 tokens.
            vocab_size=Key(128, Integer(low=2)),
            # Whose conventions (data/tokenizer_kinds.py): "sentencepiece" (bigalign's),
            # "clip" (open_clip's BPE), "siglip" (big_vision's sentencepiece use).
            tokenizer_kind=Key("sentencepiece", OneOf(tuple(tokenizer_kinds.KINDS))),
            # Its file: a sentencepiece .model ("" trains WORKDIR/tokenizer.model), for
            # "clip" open_clip's bpe_simple_vocab_16e6.txt.gz, for "siglip" big_vision's .model.
            tokenizer=Key("", Path("file"), hint=tokenizer_kinds.PATH_HINT),
        ),
        model=dict(
            embed_dim=Key(64, Integer(low=1)),
            dropout_rate=Key(0.0, Number(low=0, below=1)),
            init_logit_scale=math.log(10.0),  # log of the initial scale (SigLIP: log 10)
            init_logit_bias=-10.0,  # SigLIP: -10; softmax losses ignore the bias
            max_logit_scale=Key(0.0, Number(low=0)),  # > 0: cap on the scale (open_clip: 100)
            # A bigalign workdir (an imported model, a finished run) whose parameters, all of
            # them, a new run starts from: fine-tuning. Towers' own init_from apply after it.
            init_from=Key("", Path("directory")),
            # "bfloat16": bf16 matmuls, float32 master weights.
            compute_dtype=Key("float32", OneOf(tuple(towers.COMPUTE_DTYPES))),
            # Recompute activations in the backward pass: none, full, dots, ...
            remat=Key("none", OneOf(tuple(transformer.REMAT_POLICIES))),
            scan_layers=False,  # lax.scan over blocks: faster compiles, stacked params
            image=tower_schema("vit"),
            text=tower_schema("text"),
        ),
        loss=dict(
            name=Key("sigmoid", Registered(objectives.LOSSES)),
            # Towers whose embeddings are contrasted; the loss is the sum over these pairs.
            pairs=(("image", "text"),),
            alignment_weight=Key(0.0, Number(low=0)),  # weight of mean ||x_i - y_i||^2, per pair
            uniformity_weight=Key(0.0, Number(low=0)),  # weight of the mean of a pair's two uniformities
        ),
        # GradCache: embed the batch in num_chunks pieces and recompute each one's forward in
        # the backward pass; same gradients, tower activation memory / num_chunks. 1: off.
        grad_cache=dict(num_chunks=Key(1, Integer(low=1))),
        # How held-out sets are embedded: this many examples per device call (all devices).
        eval=dict(batch_size=Key(250, Integer(low=1))),
        # Named evaluators (evaluators/__init__.py): each runs every `every` steps (0: only
        # at the end) and after the last step, logging eval/<name>/<metric>.
        evals={name: evaluators.entry_schema(name)
               for name in ("zeroshot", "retrieval", "linear_probe", "geometry")},
    )


def base_config() -> ml_collections.ConfigDict:
    """Every key bigalign understands, with defaults for a small model (see `schema`)."""
    return schema_lib.defaults(schema())


def _check_keys(config, section: dict, prefix=""):
    """Raises UserError for the first key of `config` absent from `section` (with the
    closest valid name) or whose value breaks its rule.

    A tower (a sub-dict of `model` with a `kind`) is checked against its kind's schema.
    """
    for key in config.keys():
        dotted, value = f"{prefix}{key}", config[key]
        if prefix == "model." and towers.is_tower(value):
            encoders.get(value.kind, f"{dotted}.kind")
            _check_keys(value, tower_schema(value.kind), prefix=f"{dotted}.")
        elif prefix == "evals.":
            if not isinstance(value, ml_collections.ConfigDict) or "kind" not in value:
                raise UserError(f"{dotted} must be an evaluator entry with a kind, e.g. "
                                f"evaluators.entry('retrieval', every=1000)")
            evaluators.EVALUATORS.get(value.kind, f"{dotted}.kind")
            _check_keys(value, evaluators.entry_schema(value.kind), prefix=f"{dotted}.")
        elif key not in section:
            close = difflib.get_close_matches(key, list(section), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown config key {dotted!r}{hint} (valid keys: bigalign/config.py)")
        elif isinstance(section[key], dict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise UserError(f"{dotted} must be a section of keys, not {value!r}")
            _check_keys(value, section[key], prefix=f"{dotted}.")
        else:
            problem = schema_lib.problem(section[key], value)
            if problem:
                raise UserError(f"{dotted}={_shown(value)} {problem}")


def _shown(value) -> str:
    """A config value as a message shows it (tuples for lists, as configs write them)."""
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def import_extensions(config) -> None:
    """Imports the modules of `config.imports`, whose registrations the run may use."""
    for name in config.get("imports", ()):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise UserError(f"config.imports names {name!r}, which cannot be imported ({error}); "
                            f"install it or put it on PYTHONPATH") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises UserError (one line: the key and the fix) for the first problem found.

    Needs no devices: what depends on them is checked by `validate_on_mesh`.
    """
    rules = schema()
    # imports first: the modules it names may register what the other keys refer to.
    _check_keys({"imports": config.get("imports", ())}, {"imports": rules["imports"]})
    import_extensions(config)
    _check_keys(config, rules)

    def require(ok, message):
        if not ok:
            raise UserError(message)

    require(
        config.optimizer.warmup_steps <= config.total_steps,
        f"optimizer.warmup_steps={config.optimizer.warmup_steps} must lie in "
        f"[0, total_steps={config.total_steps}]",
    )
    data, fsdp = config.mesh.data, config.mesh.fsdp
    require(data != 0, "mesh.data=0 must be positive, or -1 for all devices left after fsdp")
    # With mesh.data=-1 the number of data shards is known once the devices are.
    _validate_batch(config, data * fsdp if data != -1 else fsdp, exact=data != -1)
    pipeline.validate(config.data)
    _validate_model(config, require, fsdp=fsdp)
    _validate_pairs(config, require)


def _validate_batch(config, num_shards: int, *, exact: bool) -> None:
    """The batch over `num_shards` data shards (with `exact`, else a divisor of their number)."""
    if config.batch_size % num_shards:
        raise UserError(
            f"batch_size={config.batch_size} is not divisible by the {num_shards} data shards; "
            f"use a multiple of {num_shards}"
        )
    chunks = config.grad_cache.num_chunks
    per_device = config.batch_size // num_shards
    if exact and per_device % chunks:
        raise UserError(
            f"grad_cache.num_chunks={chunks} must be a positive divisor of the per-device batch "
            f"{per_device} (batch_size={config.batch_size} over {num_shards} data shards); "
            f"pick a divisor of {per_device}, or 1 to turn GradCache off"
        )


def validate_on_mesh(config, mesh_size: int) -> None:
    """The checks that need the devices: the batch and GradCache chunks over the mesh's
    `mesh_size` (data x fsdp) devices."""
    _validate_batch(config, mesh_size, exact=True)


def _validate_model(config, require, *, fsdp: int) -> None:
    model = config.model
    names = towers.tower_names(config.model)
    require(len(names) >= 2, f"model has towers {names}; a contrastive model needs at least two")
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    for name in names:
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
        require(
            tower["projection"] == "linear" or tower["width"] == model.embed_dim,
            f"{key}.projection='none' uses the pooled features as the embedding, but "
            f"width={tower['width']} is not model.embed_dim={model.embed_dim}; make them equal "
            f"or use projection='linear'",
        )
        poolings = encoders.get(tower["kind"]).poolings
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


# Keys whose change would make a checkpoint mean something else or fail to restore:
# the model's shapes, the tokens, the data stream and its position, the batch, the seed.
RUN_DEFINING = ("seed", "batch_size", "text.", "model.", "data.name", "data.train_split",
                "data.seed", "data.num_train", "data.image_size", "data.audio.",
                "data.num_workers", "imports")
# ... of which these shape the parameters: all that must hold when a run starts from
# parameters alone (an imported model's step 0), with its own data, batch and seed.
PARAMETER_DEFINING = ("text.", "model.", "data.image_size", "data.audio.", "imports")
# ... except these, which change how the same model is computed or started (and a
# tower's init_from and patch_dropout: FLIP tunes without the mask at the end).
HARMLESS_MODEL_KEYS = ("model.remat", "model.compute_dtype", "model.dropout_rate",
                       "model.init_from")
HARMLESS_TOWER_KEYS = (".init_from", ".patch_dropout")


def _flat(config) -> dict:
    """{"model.image.width": 64, ...} with JSON values (tuples as lists)."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(json.loads(json.dumps(config.to_dict())), "")
    return flat


def _as_tuples(value):
    """JSON lists back to the tuples configs use."""
    if isinstance(value, dict):
        return {key: _as_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_as_tuples(item) for item in value)
    return value


def save(config, workdir: str) -> None:
    """Writes WORKDIR/config.json atomically (`load_saved` reads it back)."""
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    workdir_lib.write_atomically(workdir_lib.path(workdir) / SAVED_CONFIG, text)


def load_saved(workdir: str) -> ml_collections.ConfigDict | None:
    """The config saved in `workdir` by `save`, or None if it has none."""
    path = workdir_lib.path(workdir) / SAVED_CONFIG
    if not path.exists():
        return None
    try:
        return ml_collections.ConfigDict(_as_tuples(json.loads(path.read_text(encoding="utf-8"))))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read the saved config {path}: {error}; restore or delete it") from None


def load_source_run(workdir: str, recipe: str, role: str) -> ml_collections.ConfigDict:
    """The saved config of the run a recipe starts from (`--config RECIPE:WORKDIR`), or a
    one-line UserError naming the fix: no workdir given, or none saved there. `role`
    says what the recipe takes from it ("the run whose image tower it locks")."""
    if not workdir:
        raise UserError(f"{recipe} needs {role}: --config {recipe}:/path/to/workdir")
    source = load_saved(workdir)
    if source is None:
        raise UserError(f"{workdir!r} has no saved config ({SAVED_CONFIG}); give {recipe} "
                        f"the workdir of an imported checkpoint or a bigalign run")
    return source


def check_resume(saved, config, workdir: str, defining: tuple = RUN_DEFINING) -> list[str]:
    """Compares the config a run was started with to the one resuming it.

    A change of a `defining` key (RUN_DEFINING, or PARAMETER_DEFINING for a start from
    parameters alone) raises UserError naming the key; the other changes are returned
    as "key: old -> new" lines.
    """
    old, new = _flat(saved), _flat(config)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(unset)"), new.get(key, "(unset)")
        if before == after:
            continue
        is_defining = key.startswith(defining) and not (
            key in HARMLESS_MODEL_KEYS or key.endswith(HARMLESS_TOWER_KEYS)
        )
        if is_defining:
            raise UserError(
                f"{key} is {before!r} in the run in {workdir} but {after!r} now; its checkpoints "
                f"belong to the saved config ({SAVED_CONFIG}): resume with {key}={before!r}, or "
                f"use a new --workdir"
            )
        changes.append(f"{key}: {before!r} -> {after!r}")
    return changes
