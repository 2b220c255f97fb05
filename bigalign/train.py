"""Training: build everything from a config, run the jitted step, checkpoint, evaluate.

Command line:
    python -m bigalign.train --config configs/demo.py --workdir /tmp/run [--config.key=value ...]
Python (e.g. Colab):
    from bigalign import config as bconfig, train
    results = train.train_and_evaluate(bconfig.base_config(), "/tmp/run")

Reusing a workdir resumes from its latest checkpoint, data position included.
"""

import os
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigalign import config as config_lib
from bigalign import evaluate, grad_cache, losses, sharding
from bigalign.checkpoint import Checkpointer
from bigalign.data import pipeline, tokenizer as tokenizer_lib
from bigalign.errors import UserError
from bigalign.metrics import MetricLogger, format_table
from bigalign.models.towers import build_model


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
        decay_steps=config.total_steps,
        end_value=opt.learning_rate * opt.end_learning_rate_fraction,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on matrices (not biases, norms, scale)."""
    opt = config.optimizer
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=opt.b1,
            b2=opt.b2,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    )


def example_batch(config) -> dict:
    """A one-example batch with the shapes the model sees, for initialisation."""
    size = config.data.image_size
    return {
        "image": jnp.zeros((1, size, size, 3), jnp.float32),
        "text": jnp.ones((1, config.text.max_len), jnp.int32),
    }


def random_batch(config, rng: np.random.Generator) -> dict:
    """A global batch of random inputs with the config's shapes, for benchmarks and tests.

    Gaussian images; token rows of ids >= 3 ending in EOS (2) at a random length, then padding.
    """
    size, length, batch = config.data.image_size, config.text.max_len, config.batch_size
    tokens = rng.integers(3, config.text.vocab_size, size=(batch, length))
    lengths = rng.integers(1, length + 1, size=batch)
    tokens[np.arange(batch), lengths - 1] = 2
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return {
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "text": tokens.astype(np.int32),
    }


def create_train_state(config, model, optimizer, mesh) -> TrainState:
    """Fresh parameters and optimizer state, replicated over the mesh."""

    def init():
        rng = jax.random.key(config.seed)
        params = model.init(jax.random.fold_in(rng, 0), example_batch(config))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.fold_in(rng, 1),
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def make_output_loss(config, mesh):
    """output_loss(outputs) -> the training loss of the model's outputs for one global batch.

    The contrastive loss, plus optional alignment and uniformity terms (Wang & Isola,
    2020) weighted by `loss.alignment_weight` and `loss.uniformity_weight`, which pull
    pairs together and spread each modality over the sphere (closing the modality gap).
    """
    axis = sharding.DATA_AXIS

    def output_loss(outputs):
        image, text = outputs["embeddings"]["image"], outputs["embeddings"]["text"]  # [B, E]
        loss = losses.compute(
            config.loss.name,
            image,
            text,
            scale=outputs["logit_scale"],
            bias=outputs["logit_bias"],
            mesh=mesh,
            axis=axis,
        )
        if config.loss.alignment_weight:
            loss += config.loss.alignment_weight * losses.alignment(image, text, mesh=mesh, axis=axis)
        if config.loss.uniformity_weight:
            uniformity = losses.uniformity(image, mesh=mesh, axis=axis) + losses.uniformity(
                text, mesh=mesh, axis=axis
            )
            loss += config.loss.uniformity_weight * uniformity / 2
        return loss

    return output_loss


def make_loss_fn(config, model, mesh):
    """loss_fn(params, batch, rng) -> (loss, model outputs): the contrastive loss of one batch."""
    output_loss = make_output_loss(config, mesh)

    def loss_fn(params, batch, rng):
        outputs = model.apply(
            {"params": params}, batch, deterministic=False, rngs={"dropout": rng}
        )
        return output_loss(outputs), outputs

    return loss_fn


def make_value_and_grad(config, model, mesh):
    """fn(params, batch, rng) -> ((loss, outputs), grads); GradCache if grad_cache.num_chunks > 1."""
    if config.grad_cache.num_chunks > 1:
        return grad_cache.value_and_grad(
            model, make_output_loss(config, mesh), mesh=mesh,
            num_chunks=config.grad_cache.num_chunks, axis=sharding.DATA_AXIS,
        )
    return jax.value_and_grad(make_loss_fn(config, model, mesh), has_aux=True)


def make_train_step(config, model, optimizer, mesh):
    """The compiled step: (state, batch) -> (state, metrics). The input state is donated."""
    schedule = learning_rate_schedule(config)
    value_and_grad = make_value_and_grad(config, model, mesh)

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, outputs), grads = value_and_grad(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": loss,
            "train/logit_scale": outputs["logit_scale"],
            "train/grad_norm": optax.global_norm(grads),
            "train/logit_bias": outputs["logit_bias"],
            "train/learning_rate": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
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


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains to `config.total_steps` (resuming from WORKDIR if it holds a checkpoint), then evaluates.

    Returns the final evaluation metrics {"eval/...": float}.
    """
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = load_tokenizer(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config.model, vocab_size=tokenizer.vocab_size, max_len=config.text.max_len)
    optimizer = make_optimizer(config)
    state = create_train_state(config, model, optimizer, mesh)
    train_data = iter(
        pipeline.train_dataset(
            config.data,
            tokenizer,
            max_len=config.text.max_len,
            global_batch_size=config.batch_size,
            seed=config.seed,
        )
    )

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = checkpointer.restore(start_step, state, train_data)
        done = " (training is complete: evaluating only)" if start_step >= config.total_steps else ""
        print(f"Resuming from the checkpoint at step {start_step} in {workdir}{done}", flush=True)
    else:
        print(f"Starting a new run in {workdir}", flush=True)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{num_params / 1e6:.2f}M parameters, {jax.device_count()} devices, "
          f"mesh {dict(mesh.shape)}", flush=True)

    train_step = make_train_step(config, model, optimizer, mesh)
    logger = MetricLogger(workdir, total_steps=config.total_steps, start_step=start_step)
    for step in range(start_step + 1, config.total_steps + 1):
        batch = sharding.global_batch(next(train_data), mesh)
        state, metrics = train_step(state, batch)
        if step % config.log_every == 0 or step == config.total_steps:
            logger.log_train(step, jax.device_get(metrics))
        if step % config.checkpoint_every == 0 or step == config.total_steps:
            checkpointer.save(step, state, train_data)
    checkpointer.wait()
    checkpointer.close()
    train_data.close()  # stops the prefetch thread or worker processes

    eval_data = pipeline.eval_data(config.data, tokenizer, max_len=config.text.max_len)
    results = evaluate.evaluate(
        model, state.params, eval_data,
        batch_size=config.eval.batch_size, recall_at=tuple(config.eval.recall_at),
    )
    logger.write(config.total_steps, results)
    print(f"\nEvaluation on {len(eval_data['labels'])} held-out examples "
          f"(zero-shot chance: {1 / len(eval_data['class_names']):.4f})")
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
