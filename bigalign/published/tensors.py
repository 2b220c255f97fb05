"""Taking a checkpoint's tensors by name, each exactly once, into a parameter tree.

Both importers (open_clip, big_vision) build bigalign's tree through a `TensorTaker`
and finish with `check_complete`: a source tensor left over, or a parameter the
model has that the tree lacks or shapes differently, stops the import naming it, so
a checkpoint of another architecture never loads half-right.
"""

import jax
import numpy as np

from bigalign.errors import UserError


class TensorTaker:
    """Hands out the float32 tensors of `state` by name and remembers which were taken."""

    def __init__(self, state: dict[str, np.ndarray], source: str):
        self.state, self.source = state, source
        self.used: set[str] = set()

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.state:
            raise UserError(f"{self.source} has no tensor {name!r}: not the architecture "
                            f"this importer reads (check the model name or variant)")
        if name in self.used:
            raise ValueError(f"tensor {name!r} taken twice")  # a bug in the importer
        self.used.add(name)
        return np.asarray(self.state[name], np.float32)

    def unused(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def encoder_shape(like_encoder: dict) -> tuple[int, int]:
    """(depth, attention heads) of a model's encoder parameters (or their shapes):
    blocks `block0`.. with query kernels [W, heads, kv], or (scan_layers=True) one
    `blocks` tree stacked on a leading layer axis."""
    if "blocks" in like_encoder:
        depth, _, heads, _ = like_encoder["blocks"]["attention"]["query"]["kernel"].shape
        return depth, heads
    heads = like_encoder["block0"]["attention"]["query"]["kernel"].shape[1]
    return sum(name.startswith("block") for name in like_encoder), heads


def model_blocks(blocks: list[dict], like_encoder: dict) -> dict:
    """Per-block parameter trees laid out as the model's encoder has them: `block{i}`,
    or stacked on a leading layer axis as `blocks` (scan_layers=True)."""
    if "blocks" in like_encoder:
        return {"blocks": jax.tree.map(lambda *layers: np.stack(layers), *blocks)}
    return {f"block{i}": block for i, block in enumerate(blocks)}


def check_complete(params, like, taker: TensorTaker) -> None:
    """UserError unless every tensor was taken and `params` has exactly `like`'s arrays
    and shapes (`like`: the model's parameters or their ShapeDtypeStructs)."""
    if taker.unused():
        raise UserError(f"{taker.source}: tensors with no place in this model: "
                        f"{taker.unused()[:8]}; the checkpoint is of another architecture")
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(like)}
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise UserError(f"{taker.source}: parameter {name} is {got.get(name)} from the "
                            f"checkpoint but {want.get(name)} in the model; the config does not "
                            f"describe this checkpoint")
