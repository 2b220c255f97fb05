"""The optimizer: Adam with warmup + cosine decay, global-norm clipping (optional),
decoupled weight decay in optax's or big_vision's convention on a chosen set of
parameters, and a guard that skips non-finite updates.

The two conventions of `optimizer.weight_decay` (`optimizer.weight_decay_mode`):

- "optax" (optax.adamw, torch's AdamW, open_clip): each step subtracts
  lr(t) * (adam_direction + wd * param): the decay is scaled by the whole learning rate.
- "big_vision" (big_vision/optax.py `make`: scale_by_adam, scale(config.lr),
  add_decayed_weights(config.wd), then the schedule's multiplier): each step subtracts
  m(t) * (peak_lr * adam_direction + wd * param) with m(t) = lr(t) / peak_lr in [0, 1],
  so the decay is scaled by the schedule only, not by the base rate.

Since m(t) * wd = lr(t) * (wd / peak_lr), big_vision's rule is optax's with the decay
divided by the peak rate; both run as one optax.adamw, whose state is the same for
either, so a run can switch modes when it resumes.
"""

import jax
import numpy as np
import optax

WEIGHT_DECAY_MODES = ("optax", "big_vision")


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


# Which parameters decay (`optimizer.weight_decay_mask`), by a parameter's own name (the
# last key of its path), so stacked (scanned) biases and LayerNorm scales, which are
# 2-D, are treated like their unstacked versions.
WEIGHT_DECAY_MASKS = {
    # Weight matrices and the token table (bigalign's default).
    "kernels_and_embeddings": lambda name: name in ("kernel", "embedding"),
    # Weight matrices only: big_vision's default `wd_mults` [(".*/kernel$", 1.0)]
    # (big_vision/optax.py), which leaves token and position embeddings alone.
    "kernels": lambda name: name == "kernel",
    # Everything but gains, biases and the logit scale: open_clip's rule
    # (open_clip_train/main.py: no decay where p.ndim < 2 or the name has "bn", "ln",
    # "bias" or "logit_scale"), which does decay position embeddings (2-D) but not the
    # class token (1-D there); the SigLIP logit bias is a scalar.
    "all_but_gains_and_biases": lambda name: name not in (
        "bias", "scale", "logit_scale", "logit_bias", "cls_token"),
}


def weight_decay_mask(config):
    """params -> the tree of booleans saying which parameters `config` decays."""
    decays = WEIGHT_DECAY_MASKS[config.optimizer.weight_decay_mask]

    def mask(params):
        def leaf(path, _):
            names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
            return decays(names[-1])

        return jax.tree_util.tree_map_with_path(leaf, params)

    return mask


def adamw_weight_decay(config) -> float:
    """The `weight_decay` optax.adamw needs to apply `optimizer.weight_decay` in the
    configured convention (module docstring): as is for "optax", divided by the peak
    learning rate for "big_vision"."""
    opt = config.optimizer
    if opt.weight_decay_mode == "big_vision":
        return opt.weight_decay / opt.learning_rate
    return opt.weight_decay


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping (none when `grad_clip_norm` is 0), then AdamW with the
    schedule, Adam's `eps`, and decoupled weight decay on the masked parameters.

    Wrapped in `optax.apply_if_finite`: a gradient with a NaN or Inf leaves the
    parameters and moments as they were and is counted; the loop stops the run after
    `max_consecutive_nonfinite` in a row (optax itself never lets one through).
    """
    opt = config.optimizer
    clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity()
    adamw = optax.chain(
        clip,
        optax.adamw(
            learning_rate_schedule(config),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=adamw_weight_decay(config),
            mask=weight_decay_mask(config),
        ),
    )
    return optax.apply_if_finite(adamw, max_consecutive_errors=np.iinfo(np.int32).max)
