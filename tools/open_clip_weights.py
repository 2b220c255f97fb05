"""open_clip's CLIP parameters (a state dict of NumPy arrays) as bigalign's parameter tree.

Why: to run the same model with the same weights in both frameworks (the benchmark
tools/bench_vs_openclip.py starts both from one initialisation and checks that the
first losses agree). No torch is needed here: the caller turns tensors into arrays.

The architectures must agree: open_clip's ViT without `ln_pre` (`no_ln_pre=True`),
class-token pooling, LayerNorm eps 1e-6 and tanh-approximated GELU as flax's defaults
are; bigalign's image tower with `pool="cls"`, its text tower causal with `last`
pooling (open_clip's `argmax` pooling picks the same token when the end-of-text id is
the largest id and nothing follows it but padding). Every source tensor is used
exactly once and every target parameter is filled, or the conversion stops naming the
ones left over; the only parameter open_clip lacks, the patch embedding's bias, is 0.
"""

import jax
import numpy as np


class Converter:
    """Takes tensors out of `state` by name and remembers which were taken."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = {name: np.asarray(value, np.float32) for name, value in state.items()}
        self.used: set[str] = set()

    def take(self, name: str) -> np.ndarray:
        if name not in self.state:
            raise KeyError(f"open_clip state dict has no tensor {name!r}")
        if name in self.used:
            raise KeyError(f"tensor {name!r} used twice")
        self.used.add(name)
        return self.state[name]

    def unused(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _layer_norm(take, prefix: str) -> dict:
    return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}


def _dense(take, prefix: str) -> dict:  # torch Linear stores [out, in]
    return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}


def _block(take, prefix: str, num_heads: int) -> dict:
    """One residual attention block: ln_1, attn (packed q/k/v), ln_2, mlp."""
    in_weight, in_bias = take(f"{prefix}.attn.in_proj_weight"), take(f"{prefix}.attn.in_proj_bias")
    width = in_weight.shape[1]
    heads = (num_heads, width // num_heads)
    attention = {}
    for name, weight, bias in zip(("query", "key", "value"), np.split(in_weight, 3),
                                  np.split(in_bias, 3)):
        attention[name] = {"kernel": weight.T.reshape(width, *heads), "bias": bias.reshape(heads)}
    attention["out"] = {"kernel": take(f"{prefix}.attn.out_proj.weight").T.reshape(*heads, width),
                        "bias": take(f"{prefix}.attn.out_proj.bias")}
    return {"ln_attention": _layer_norm(take, f"{prefix}.ln_1"), "attention": attention,
            "ln_mlp": _layer_norm(take, f"{prefix}.ln_2"),
            "mlp": {"fc1": _dense(take, f"{prefix}.mlp.c_fc"),
                    "fc2": _dense(take, f"{prefix}.mlp.c_proj")}}


def _encoder(take, prefix: str, depth: int, num_heads: int, final_norm: str) -> dict:
    blocks = {f"block{i}": _block(take, f"{prefix}.resblocks.{i}", num_heads)
              for i in range(depth)}
    return {**blocks, "ln_final": _layer_norm(take, final_norm)}


def _depth(like_encoder: dict) -> int:
    if "blocks" in like_encoder:
        raise ValueError("scanned towers (model.scan_layers=True) are not converted; "
                         "convert unscanned, then train with scan_layers=False")
    return sum(name.startswith("block") for name in like_encoder)


def params_from_open_clip(state: dict[str, np.ndarray], like, *, image_heads: int,
                          text_heads: int) -> dict:
    """bigalign params for a two-tower ("image", "text") model shaped like `like`."""
    converter = Converter(state)
    take = converter.take
    if "visual.ln_pre.weight" in state:
        raise ValueError("this open_clip model has ln_pre; bigalign's ViT has none "
                         "(build open_clip with vision_cfg no_ln_pre=True)")
    positions = take("visual.positional_embedding")  # [1 + patches, W]: the class token's first
    patch_kernel = take("visual.conv1.weight")  # [W, C, p, p]
    image_encoder = {
        "patch_embed": {"kernel": patch_kernel.transpose(2, 3, 1, 0),
                        "bias": np.zeros(patch_kernel.shape[0], np.float32)},
        "cls_token": (take("visual.class_embedding") + positions[0])[None, None],
        "position_embedding": positions[None, 1:],
        "encoder": _encoder(take, "visual.transformer",
                            _depth(like["image"]["encoder"]["encoder"]), image_heads,
                            "visual.ln_post"),
    }
    text_encoder = {
        "token_embed": {"embedding": take("token_embedding.weight")},
        "position_embedding": take("positional_embedding")[None],
        "encoder": _encoder(take, "transformer", _depth(like["text"]["encoder"]["encoder"]),
                            text_heads, "ln_final"),
    }
    params = {
        "image": {"encoder": image_encoder, "projection": {"kernel": take("visual.proj")}},
        "text": {"encoder": text_encoder, "projection": {"kernel": take("text_projection")}},
        "logit_scale": take("logit_scale").reshape(()),
        "logit_bias": np.zeros((), np.float32),  # open_clip CLIP has none (softmax ignores it)
    }
    if converter.unused():
        raise ValueError(f"open_clip tensors not converted: {converter.unused()}")
    expected = jax.tree_util.tree_structure(like)
    if jax.tree_util.tree_structure(params) != expected:
        raise ValueError(f"converted parameters {jax.tree_util.tree_structure(params)} do not "
                         f"match the model's {expected}")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree_util.tree_leaves(like)):
        if got.shape != want.shape:
            raise ValueError(f"{jax.tree_util.keystr(path)}: open_clip gives {got.shape}, "
                             f"the model has {want.shape}")
    return params
