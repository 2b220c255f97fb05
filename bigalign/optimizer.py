"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, weight decay on
weight matrices only, and a guard that skips non-finite updates."""

import jax
import numpy as np
import optax


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
