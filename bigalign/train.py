"""Training: build everything from a config, run the jitted step, checkpoint, evaluate.

Command line:
    python -m bigalign.train --config configs/demo.py --workdir /tmp/run [--config.key=value ...]
Python (e.g. Colab):
    from bigalign import config as bconfig, train
    results = train.train_and_evaluate(bconfig.base_config(), "/tmp/run")

Reusing a workdir resumes from its latest checkpoint, data position included.
"""

import itertools
import os
import sys
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigalign import config as config_lib
from bigalign import checkpoint, evaluate, flops, grad_cache, losses, preemption, sharding
from bigalign.data import held_out, pipeline, tokenizer as tokenizer_lib
from bigalign.data.skipping import SKIPPED
from bigalign.errors import UserError
from bigalign.metrics import MetricLogger, format_table
from bigalign.models import towers


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming replays it exactly


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay over the remaining steps."""
    opt = config.optimizer
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=max(config.total_steps, opt.warmup_steps + 1),  # optax needs a decay phase
        end_value=opt.learning_rate * opt.end_learning_rate_fraction,
    )


DECAYED_PARAMS = ("kernel", "embedding")  # weight matrices and the token table


def weight_decay_mask(params):
    """True for the parameters AdamW decays: by name, so stacked (scanned) biases and
    LayerNorm scales, which are 2-D, are left alone like their unstacked versions."""

    def decays(path, _):
        names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
        return names[-1] in DECAYED_PARAMS

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay on `DECAYED_PARAMS` only.

    Wrapped in `optax.apply_if_finite`: a gradient with a NaN or Inf leaves the
    parameters and moments as they were and is counted; the loop stops the run after
    `max_consecutive_nonfinite` in a row (optax itself never lets one through).
    """
    opt = config.optimizer
    adamw = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=opt.b1,
            b2=opt.b2,
            weight_decay=opt.weight_decay,
            mask=weight_decay_mask,
        ),
    )
    return optax.apply_if_finite(adamw, max_consecutive_errors=np.iinfo(np.int32).max)


# What the input pipeline sends per modality (others: float32).
INPUT_DTYPES = {"image": jnp.uint8, "text": jnp.int32}


def example_batch(config) -> dict:
    """A one-example batch with the shapes every tower sees, for initialisation."""
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    return {
        name: jnp.ones((1, *shapes[name]), INPUT_DTYPES.get(name, jnp.float32))
        for name in towers.tower_names(config.model)
    }


def random_batch(config, rng: np.random.Generator) -> dict:
    """A global batch of random inputs with the config's shapes, for benchmarks and tests.

    Uniform uint8 pixels, Gaussian spectrograms; token rows of ids >= 3 ending in EOS (2)
    at a random length, then padding.
    """
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    batch = {}
    for name in towers.tower_names(config.model):
        shape = (config.batch_size, *shapes[name])
        if name == "image":
            batch[name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif name == "text":
            length = config.text.max_len
            tokens = rng.integers(3, config.text.vocab_size, size=shape)
            lengths = rng.integers(1, length + 1, size=config.batch_size)
            tokens[np.arange(config.batch_size), lengths - 1] = 2
            tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
            batch[name] = tokens.astype(np.int32)
        else:
            batch[name] = rng.normal(size=shape).astype(np.float32)
    return batch


def frozen_towers(config) -> frozenset:
    """Names of the towers locked by `model.<tower>.frozen` (LiT)."""
    return frozenset(name for name in towers.tower_names(config.model) if config.model[name].frozen)


def split_frozen(params: dict, frozen: frozenset) -> tuple[dict, dict]:
    """params -> (trainable, frozen) by top-level name; `{**trainable, **frozen}` is params."""
    trainable = {name: value for name, value in params.items() if name not in frozen}
    locked = {name: value for name, value in params.items() if name in frozen}
    return trainable, locked


def _initializer(config, model, optimizer):
    """init() -> a fresh TrainState whose parameters carry their logical axis names."""
    frozen = frozen_towers(config)

    def init():
        rng = jax.random.key(config.seed)
        params = model.init(jax.random.fold_in(rng, 0), example_batch(config))["params"]
        trainable, _ = split_frozen(params, frozen)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(trainable),  # moments inherit the logical axis names
            rng=jax.random.fold_in(rng, 1),
        )

    return init


def state_shardings(config, model, optimizer, mesh):
    """The layout of the train state on `mesh`: parameters and their optimizer moments split
    over `fsdp` along the model width (see sharding.LOGICAL_AXIS_RULES), the rest replicated."""
    return sharding.logical_shardings(jax.eval_shape(_initializer(config, model, optimizer)), mesh)


def create_train_state(config, model, optimizer, mesh) -> TrainState:
    """Fresh parameters and optimizer state, laid out by `state_shardings`.

    Frozen towers get no optimizer state.
    """
    init = _initializer(config, model, optimizer)
    shardings = state_shardings(config, model, optimizer, mesh)
    return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()


def make_output_loss(config, mesh):
    """output_loss(outputs) -> (loss, metrics): the training loss of the model's outputs.

    The loss is the sum over `loss.pairs` of the contrastive loss of the two towers'
    embeddings (for more than two towers, as in ImageBind / LanguageBind binding to
    one anchor modality), plus optional alignment and uniformity terms (Wang & Isola,
    2020) weighted by `loss.alignment_weight` and `loss.uniformity_weight`, which pull
    pairs together and spread each modality over the sphere (closing the modality gap).
    """
    axis = sharding.BATCH_AXES

    def pair_loss(x, y, outputs):  # x, y: [B, E]
        loss = losses.compute(
            config.loss.name, x, y, scale=outputs["logit_scale"], bias=outputs["logit_bias"],
            mesh=mesh, axis=axis,
        )
        if config.loss.alignment_weight:
            loss += config.loss.alignment_weight * losses.alignment(x, y, mesh=mesh, axis=axis)
        if config.loss.uniformity_weight:
            uniformity = losses.uniformity(x, mesh=mesh, axis=axis) + losses.uniformity(
                y, mesh=mesh, axis=axis
            )
            loss += config.loss.uniformity_weight * uniformity / 2
        return loss

    def output_loss(outputs):
        embeddings = outputs["embeddings"]
        metrics = {
            "train/logit_scale": outputs["logit_scale"],
            "train/logit_bias": outputs["logit_bias"],
        }
        total = 0.0
        for first, second in config.loss.pairs:
            loss = pair_loss(embeddings[first], embeddings[second], outputs)
            metrics[f"train/loss/{first}_{second}"] = loss
            total += loss
        return total, metrics

    return output_loss


def make_loss_fn(config, model, mesh):
    """loss_fn(params, batch, rng) -> (loss, metrics): the contrastive loss of one batch."""
    output_loss = make_output_loss(config, mesh)

    def loss_fn(params, batch, rng):
        outputs = model.apply(
            {"params": params}, batch, deterministic=False, rngs={"dropout": rng}
        )
        return output_loss(outputs)

    return loss_fn


def make_value_and_grad(config, model, mesh):
    """fn(params, batch, rng) -> ((loss, metrics), grads of the trainable params).

    Frozen towers enter as constants, so no backward pass runs through them. With
    `grad_cache.num_chunks` > 1 the gradient comes from GradCache.
    """
    frozen = frozen_towers(config)
    loss_fn = make_loss_fn(config, model, mesh)

    def value_and_grad(params, batch, rng):
        trainable, locked = split_frozen(params, frozen)
        with sharding.logical_rules(mesh):  # activations split over data x fsdp
            if config.grad_cache.num_chunks == 1:
                return jax.value_and_grad(
                    lambda trainable: loss_fn({**trainable, **locked}, batch, rng), has_aux=True
                )(trainable)

            def apply(trainable, inputs, **kwargs):
                return model.apply({"params": {**trainable, **locked}}, inputs, **kwargs)

            return grad_cache.value_and_grad(
                apply, make_output_loss(config, mesh), mesh=mesh,
                num_chunks=config.grad_cache.num_chunks, axis=sharding.BATCH_AXES,
            )(trainable, batch, rng)

    return value_and_grad


def make_train_step(config, model, optimizer, mesh, state_sharding):
    """The compiled step: (state, batch) -> (state, metrics). The input state is donated.

    `state_sharding` is the layout of the train state (`sharding.shardings_of(state)`),
    kept on output so parameters stay split over fsdp.
    """
    schedule = learning_rate_schedule(config)
    value_and_grad = make_value_and_grad(config, model, mesh)
    frozen = frozen_towers(config)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = value_and_grad(state.params, batch, rng)
        trainable, locked = split_frozen(state.params, frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params = {**optax.apply_updates(trainable, updates), **locked}
        metrics = {
            "train/loss": loss,
            **metrics,
            "train/grad_norm": optax.global_norm(grads),
            "train/learning_rate": schedule(state.step),
            "train/skipped_steps": opt_state.total_notfinite,  # non-finite, not applied
            "train/nonfinite_streak": opt_state.notfinite_count,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def load_tokenizer(config, workdir: str):
    """The configured sentencepiece model, or WORKDIR/tokenizer.model trained on the data's captions."""
    if config.text.tokenizer:
        return tokenizer_lib.Tokenizer.load(config.text.tokenizer)
    return tokenizer_lib.load_or_train(
        os.path.join(workdir, "tokenizer.model"),
        lambda: pipeline.tokenizer_corpus(config.data),
        config.text.vocab_size,
    )


def train_step_flops(config, vocab_size: int) -> int:
    """Model FLOPs of one train step (forward + backward, 2 per multiply-add; see flops.py)."""
    resolved = towers.resolve_towers(config.model, vocab_size=vocab_size, max_len=config.text.max_len)
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    forward = {
        name: flops.tower_forward_flops(tower, shapes[name], config.model.embed_dim)
        for name, tower in resolved.items()
    }
    return flops.train_step_flops(
        forward, frozen_towers(config), config.batch_size, config.model.embed_dim,
        len(config.loss.pairs),
    )


def print_model_summary(config, params, vocab_size: int) -> None:
    """One line per tower: kind, size, parameter count, frozen or not."""
    resolved = towers.resolve_towers(config.model, vocab_size=vocab_size, max_len=config.text.max_len)
    for name, tower in resolved.items():
        count = sum(x.size for x in jax.tree.leaves(params[name]))
        variant = config.model[name].variant or "custom"
        locked = ", frozen" if config.model[name].frozen else ""
        print(f"  {name:<6} {tower['kind']:<5} {variant:<10} width {tower['width']:>4}, "
              f"depth {tower['depth']:>2}: {count / 1e6:8.2f}M parameters{locked}", flush=True)


def load_initial_towers(config, state: TrainState) -> TrainState:
    """Replaces each tower that has `model.<tower>.init_from` with the one in that run (LiT)."""
    params = dict(state.params)
    for name in towers.tower_names(config.model):
        source = config.model[name].init_from
        if source:
            params[name] = checkpoint.load_tower(source, name, like=params[name])
            print(f"Initialised tower {name!r} from {source}", flush=True)
    return state.replace(params=params)


def train_loop(config, state, train_step, train_data, mesh, checkpointer, logger, start_step,
               stop) -> tuple[TrainState, int]:
    """Steps from `start_step` to `config.total_steps`, logging and checkpointing.

    Returns the final state and 0 when done, or the step after which a stop signal
    (SIGTERM / SIGINT) ended the loop, with a checkpoint of that step. Raises UserError once
    `max_consecutive_nonfinite` steps in a row were skipped as non-finite.
    """
    skipped = 0  # unreadable examples this process dropped since the last log line
    previous = None  # the last step's metrics, read one step late to keep a step queued
    for step in range(start_step + 1, config.total_steps + 1):
        host_batch = next(train_data)
        skipped += host_batch.pop(SKIPPED)
        state, metrics = train_step(state, sharding.global_batch(host_batch, mesh))
        if previous is not None:
            check_finite(config, previous, step - 1, checkpointer)
        previous = metrics
        if step % config.log_every == 0 or step == config.total_steps:
            logger.log_train(step, {**jax.device_get(metrics), "data/skipped": skipped})
            skipped = 0
        stopping = stop.requested()
        # Skipped steps leave the parameters as they were, so saving during a streak is safe.
        if stopping or step % config.checkpoint_every == 0 or step == config.total_steps:
            checkpointer.save(step, state, train_data)
        if stopping:
            return state, step
    if previous is not None:
        check_finite(config, previous, config.total_steps, checkpointer)
    return state, 0


def check_finite(config, metrics: dict, step: int, checkpointer) -> None:
    """Raises UserError once `max_consecutive_nonfinite` steps in a row were skipped."""
    streak = int(metrics["train/nonfinite_streak"])
    if streak >= config.max_consecutive_nonfinite:
        last = checkpointer.latest_step()
        kept = (f"the last checkpoint, step {last}, holds parameters from before them"
                if last else "no checkpoint was written")
        raise UserError(
            f"{streak} consecutive steps up to step {step} had a non-finite loss or gradient "
            f"(NaN/Inf) and were skipped, reaching max_consecutive_nonfinite; stopped ({kept}): "
            f"lower optimizer.learning_rate or check the data, then rerun"
        )


def describe_eval_data(eval_data: dict) -> str:
    """What was evaluated on, e.g. "1000 held-out pairs; zero-shot over 24 classes on 1000 examples"."""
    parts = []
    if "pairs" in eval_data:
        count = len(next(iter(eval_data["pairs"]["inputs"].values())))
        parts.append(f"{count} held-out pairs")
    if "classes" in eval_data:
        classes = eval_data["classes"]
        parts.append(f"zero-shot over {len(classes['class_names'])} classes on "
                     f"{len(classes['labels'])} examples (chance "
                     f"{1 / len(classes['class_names']):.4f})")
    return "; ".join(parts) or "no held-out data configured (data.eval_name, data.zeroshot_name)"


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains to `config.total_steps` (resuming from WORKDIR if it holds a checkpoint), then evaluates.

    Returns the final evaluation metrics {"eval/...": float}, or {} when a SIGTERM or
    SIGINT stopped training (after checkpointing the step it was on).
    """
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = load_tokenizer(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    modalities = towers.tower_names(config.model)
    model = towers.build_model(
        config.model, vocab_size=tokenizer.vocab_size, max_len=config.text.max_len
    )
    optimizer = make_optimizer(config)
    state = create_train_state(config, model, optimizer, mesh)
    train_data = iter(
        pipeline.train_dataset(
            config.data,
            tokenizer,
            max_len=config.text.max_len,
            global_batch_size=config.batch_size,
            seed=config.seed,
            modalities=modalities,
        )
    )

    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = checkpointer.restore(start_step, state, train_data)
        done = " (training is complete: evaluating only)" if start_step >= config.total_steps else ""
        print(f"Resuming from the checkpoint at step {start_step} in {workdir}{done}", flush=True)
    else:
        print(f"Starting a new run in {workdir}", flush=True)
        state = load_initial_towers(config, state)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_flops = train_step_flops(config, tokenizer.vocab_size)
    print(f"{num_params / 1e6:.2f}M parameters, {jax.device_count()} devices, "
          f"mesh {dict(mesh.shape)}, {step_flops / 1e12:.4g} TFLOPs per train step", flush=True)
    print_model_summary(config, state.params, tokenizer.vocab_size)

    train_step = make_train_step(config, model, optimizer, mesh, sharding.shardings_of(state))
    logger = MetricLogger(
        workdir, total_steps=config.total_steps, start_step=start_step,
        flops_per_step=step_flops, num_devices=mesh.size,
        peak_flops_per_device=flops.peak_flops_per_device(jax.devices()[0].device_kind),
    )
    try:
        with preemption.StopRequest() as stop:
            state, stopped = train_loop(config, state, train_step, train_data, mesh,
                                        checkpointer, logger, start_step, stop)
            checkpointer.wait()
    finally:  # also on errors: no stray prefetch thread or worker processes
        checkpointer.close()
        train_data.close()
    if stopped:
        reason = stop.signal_name or "a signal to another process"
        print(f"Stopped by {reason} after step {stopped}, with a checkpoint of it in {workdir}; "
              f"run the same command again to resume", flush=True)
        return {}

    eval_data = held_out.eval_data(
        config.data, tokenizer, max_len=config.text.max_len, modalities=modalities
    )
    # Every pair of towers, trained or not: binding two modalities to a third one aligns
    # them with each other too (ImageBind's emergent retrieval).
    eval_pairs = list(itertools.combinations(modalities, 2))
    results = evaluate.evaluate(
        model, state.params, eval_data, pairs=eval_pairs,
        batch_size=config.eval.batch_size, recall_at=tuple(config.eval.recall_at),
    )
    logger.write(config.total_steps, results)
    print(f"\nEvaluation: {describe_eval_data(eval_data)}")
    if results:
        print(format_table(results), flush=True)
    return results


def main(argv):
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save info lines off the console
    if flags.FLAGS.config is None:
        sys.exit("bigalign: --config is required, e.g. --config configs/demo.py")
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except UserError as error:
        sys.exit(f"bigalign: error: {error}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and metrics.jsonl.")
    flags.mark_flags_as_required(["workdir"])


def _parse_flags(argv):
    """absl flag parsing, with bad `--config.key=value` overrides as one-line errors."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"bigalign: error: {error} (see --helpfull)")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections nests a KeyError's repr in the message: unescape it onto one line.
        message = str(error).replace("\\'", "'").replace("\\n", " ")
        if message[:1] in "'\"" and message[:1] == message[-1:]:
            message = message[1:-1]
        sys.exit(f"bigalign: error in a --config override: {message}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)
