"""The train state and the jitted train step: the model's outputs, the registered loss,
the gradient (plain, or GradCache in chunks), the optimizer update."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigalign import grad_cache, objectives, sharding
from bigalign.models import towers
from bigalign.optimizer import learning_rate_schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming replays it exactly


def frozen_towers(config) -> frozenset:
    """Names of the towers locked by `model.<tower>.frozen` (LiT)."""
    return frozenset(name for name in towers.tower_names(config.model) if config.model[name].frozen)


def split_frozen(params: dict, frozen: frozenset) -> tuple[dict, dict]:
    """params -> (trainable, frozen) by top-level name; `{**trainable, **frozen}` is params."""
    trainable = {name: value for name, value in params.items() if name not in frozen}
    locked = {name: value for name, value in params.items() if name in frozen}
    return trainable, locked


def initializer(config, model, optimizer, example_batch: dict):
    """init() -> a fresh TrainState whose parameters carry their logical axis names.

    Frozen towers get no optimizer state.
    """
    frozen = frozen_towers(config)

    def init():
        rng = jax.random.key(config.seed)
        params = model.init(jax.random.fold_in(rng, 0), example_batch)["params"]
        trainable, _ = split_frozen(params, frozen)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(trainable),  # moments inherit the logical axis names
            rng=jax.random.fold_in(rng, 1),
        )

    return init


def make_output_loss(config, mesh):
    """output_loss(outputs, batch) -> (loss, metrics): the registered `loss.name` of the
    model's outputs, with the logit scale and bias as metrics."""
    loss = objectives.LOSSES.get(config.loss.name, "loss.name")
    context = objectives.LossContext(config.loss, mesh, sharding.BATCH_AXES)

    def output_loss(outputs, batch):
        value, metrics = loss(outputs, batch, context)
        return value, {"train/logit_scale": outputs["logit_scale"],
                       "train/logit_bias": outputs["logit_bias"], **metrics}

    return output_loss


def make_loss_fn(config, model, mesh):
    """loss_fn(params, batch, rng) -> (loss, metrics): the loss of one batch."""
    output_loss = make_output_loss(config, mesh)

    def loss_fn(params, batch, rng):
        outputs = model.apply(
            {"params": params}, batch, deterministic=False, rngs={"dropout": rng}
        )
        return output_loss(outputs, batch)

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

    `state_sharding` is the layout of the train state, kept on output so parameters stay
    split over fsdp.
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

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def state_shardings(init, mesh):
    """The layout of the state `init()` makes: parameters and their optimizer moments split
    over `fsdp` along the model width (sharding.LOGICAL_AXIS_RULES), the rest replicated."""
    return sharding.logical_shardings(jax.eval_shape(init), mesh)


def create_state(init, shardings) -> TrainState:
    """Runs `init` on the devices, laid out by `shardings` (no host copy)."""
    return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
