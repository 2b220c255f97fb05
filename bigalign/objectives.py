"""Training objectives: the loss registry that `config.loss.name` chooses from.

A registered loss is a function

    loss(outputs, batch, context) -> (scalar loss, {"train/...": scalar metrics})

that sees everything a step has:
- `outputs["embeddings"]`: {tower: L2-normalised [B, E]} over the global batch, split
  over the mesh's batch axes; `outputs["tokens"]`: {tower: [B, T, W]}, each encoder's
  sequence before pooling (absent under GradCache, which caches embeddings only);
  `outputs["logit_scale"]` (positive) and `outputs["logit_bias"]`, learnable scalars;
- `batch`: the step's model inputs {modality: [B, ...]} (token ids, pixels, ...);
- `context`: the `loss` config section, the mesh and its batch axes (None without a mesh).

So the next losses fit without a new interface:
- pairwise losses (CLIP, SigLIP and their ring variants, hard-negative InfoNCE, SupCon
  with several positives): `pairwise(pair_loss)` sums a function of two towers'
  embeddings over `loss.pairs`; the four built-in pair losses are registered that way;
- n-ary losses over three or more towers (Symile's multilinear inner product, GRAM's
  Gram-determinant volume): read every tower in `outputs["embeddings"]` at once;
- captioning (CoCa, CapPa): a decoder applied to `outputs["tokens"]["image"]`, with
  `batch["text"]` as the targets;
- weighted losses (CWCL's continuous weights, label-smoothed targets): weights computed
  from the embeddings or from inputs in `batch`.
A loss with learnable parameters of its own keeps them in the model, like the logit
scale and bias.

Adding one is one function and a config line:

    @objectives.LOSSES.register("my_loss")
    def my_loss(outputs, batch, context): ...

    --config.loss.name=my_loss
"""

import dataclasses
from collections.abc import Callable

from bigalign import losses
from bigalign.registry import Registry

LOSSES = Registry("loss")


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss may need besides the step's outputs and batch."""

    config: object  # the config's `loss` section (loss-specific keys live there)
    mesh: object  # jax.sharding.Mesh, or None on one device
    axis: object  # the mesh axis (or tuple of axes) the batch is split over


PairLoss = Callable  # (x [B, E], y [B, E], *, scale, bias, mesh, axis) -> scalar


def pairwise(pair_loss: PairLoss):
    """A loss that sums `pair_loss(x, y, ...)` over `loss.pairs` (metric `train/loss/<a>_<b>`).

    With several towers this binds them as ImageBind / LanguageBind do (each pair with
    one anchor modality). `loss.alignment_weight` and `loss.uniformity_weight` add the
    Wang & Isola (2020) terms per pair: they pull pairs together and spread each
    modality over the sphere (closing the modality gap).
    """

    def loss(outputs, batch, context: LossContext):
        del batch
        config, mesh, axis = context.config, context.mesh, context.axis
        embeddings = outputs["embeddings"]
        metrics, total = {}, 0.0
        for first, second in config.pairs:
            x, y = embeddings[first], embeddings[second]  # [B, E] each
            value = pair_loss(x, y, scale=outputs["logit_scale"], bias=outputs["logit_bias"],
                              mesh=mesh, axis=axis)
            if config.alignment_weight:
                value += config.alignment_weight * losses.alignment(x, y, mesh=mesh, axis=axis)
            if config.uniformity_weight:
                uniformity = (losses.uniformity(x, mesh=mesh, axis=axis)
                              + losses.uniformity(y, mesh=mesh, axis=axis))
                value += config.uniformity_weight * uniformity / 2
            metrics[f"train/loss/{first}_{second}"] = value
            total += value
        return total, metrics

    return loss


def _contrastive(name: str) -> PairLoss:
    """The pair loss `losses.compute(name, ...)`."""
    return lambda x, y, **kwargs: losses.compute(name, x, y, **kwargs)


for _name in losses.NAMES:  # softmax, softmax_tiled, sigmoid, sigmoid_chunked
    LOSSES.register(_name, pairwise(_contrastive(_name)))
