"""big_vision SigLIP checkpoints (.npz): their config, and their arrays as bigalign params.

big_vision's two-tower model (google-research/big_vision, read for the facts:
models/vit.py, models/proj/image_text/text_transformer.py and two_towers.py):
- `img`: a ViT. `embedding` (a conv with bias) -> + `pos_embedding` -> [`cls` token
  when pool_type="tok"] -> `Transformer`: blocks `encoderblock_{i}` (`encoderblock`
  stacked on a leading axis when trained with scan=True), each LayerNorm_0,
  MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0 (Dense_0, GELU, Dense_1),
  then `encoder_norm` -> pooled by `MAPHead_0` (probe, attention, LayerNorm_0,
  MlpBlock_0), the mean or the class token -> `head`, a Dense with bias, if out_dim
  gives one (the released SigLIPs have none: out_dim=(None, dim), SigLIP_demo.ipynb).
- `txt`: `Embed_0` + `pos_embedding` -> `Encoder_0` (the same blocks, no mask at all:
  bidirectional, padding attended) -> the last position (pool_type="last": the
  tokenizer's sticky EOS is always there) -> `head`, a Dense with bias.
- `t`: the log of the logit scale, [1]; `b`: the logit bias, [1] (absent without bias_init).
Flax defaults throughout: LayerNorm eps 1e-6, tanh-approximated GELU; pixels in [-1, 1].
Files saved with their optimizer hold the parameters under `params/` (or
`opt/target/`); sizes, heads included, are read from the arrays' shapes.
"""

import ml_collections
import numpy as np

from bigalign import config as config_lib
from bigalign.errors import UserError
from bigalign.models.sizes import parse_variant
from bigalign.published.tensors import TensorTaker, check_complete, model_blocks

PARAMETER_PREFIXES = ("params/", "opt/target/")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The parameter arrays of a big_vision .npz, by their '/'-joined names."""
    if not path.endswith(".npz"):
        raise UserError(f"{path}: expected a big_vision .npz checkpoint")
    with np.load(path, allow_pickle=False) as arrays:
        state = {name: arrays[name] for name in arrays.files}
    for prefix in PARAMETER_PREFIXES:
        if any(name.startswith(prefix) for name in state):
            state = {name[len(prefix):]: value for name, value in state.items()
                     if name.startswith(prefix)}
    return state


def _blocks(shapes: dict, prefix: str) -> tuple[int, tuple]:
    """(depth, the query kernel's [W, heads, kv]) of the blocks under `prefix`."""
    stacked = f"{prefix}/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    if stacked in shapes:
        return shapes[stacked][0], shapes[stacked][1:]
    depth = sum(name.startswith(f"{prefix}/encoderblock_") and name.endswith("/LayerNorm_0/scale")
                for name in shapes)
    if not depth:
        raise UserError(f"the checkpoint has no blocks under {prefix}: not a big_vision SigLIP")
    return depth, shapes[f"{prefix}/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]


def _mlp_dim(shapes: dict, prefix: str) -> int:
    for block in ("encoderblock", "encoderblock_0"):
        name = f"{prefix}/{block}/MlpBlock_0/Dense_0/kernel"
        if name in shapes:
            return shapes[name][-1]
    raise UserError(f"the checkpoint has no MLP under {prefix}: not a big_vision SigLIP")


def model_config(shapes: dict[str, tuple], variant: str = "") -> ml_collections.ConfigDict:
    """A config of the SigLIP in a checkpoint with these array `shapes`; `variant`
    ("B/16"), when given, is checked against them. Tokenizer: big_vision's SigLIP one."""
    if "img/embedding/kernel" not in shapes or "txt/Embed_0/embedding" not in shapes:
        raise UserError("the checkpoint has no img/embedding or txt/Embed_0: not a big_vision "
                        "two-tower (SigLIP) model")
    patch, _, _, image_width = shapes["img/embedding/kernel"]
    image_depth, (_, image_heads, _) = _blocks(shapes, "img/Transformer")
    text_depth, (text_width, text_heads, _) = _blocks(shapes, "txt/Encoder_0")
    if variant:
        dims, variant_patch = parse_variant(variant)
        found = dict(width=image_width, depth=image_depth, num_heads=image_heads,
                     mlp_dim=_mlp_dim(shapes, "img/Transformer"))
        if dims != found or variant_patch not in (None, patch):
            raise UserError(f"--variant {variant} is {dims} with patch {variant_patch}, the "
                            f"checkpoint's image tower {found} with patch {patch}")
    grid = round(np.sqrt(shapes["img/pos_embedding"][1]))
    image_pool = ("map" if "img/MAPHead_0/probe" in shapes
                  else "cls" if "img/cls" in shapes else "gap")
    embed_dim = shapes["txt/head/kernel"][1]
    config = config_lib.base_config()
    config.loss.name = "sigmoid"
    config.data.image_size = grid * patch
    config.text.update(max_len=shapes["txt/pos_embedding"][1],
                       vocab_size=shapes["txt/Embed_0/embedding"][0], tokenizer_kind="siglip")
    config.model.update(embed_dim=embed_dim, init_logit_scale=np.log(10.0).item(),
                        init_logit_bias=-10.0)
    config.model.image.update(
        width=image_width, depth=image_depth, num_heads=image_heads,
        mlp_dim=_mlp_dim(shapes, "img/Transformer"), patch_size=patch, pool=image_pool,
        projection="linear" if "img/head/kernel" in shapes else "none",
        projection_bias="img/head/kernel" in shapes, pixel_norm="unit")
    config.model.text.update(
        width=text_width, depth=text_depth, num_heads=text_heads,
        mlp_dim=_mlp_dim(shapes, "txt/Encoder_0"), causal=False, mask_padding=False,
        pool="map" if "txt/MAPHead_0/probe" in shapes else "final", projection_bias=True)
    return config


def _dense(take, prefix: str) -> dict:
    return {"kernel": take(f"{prefix}/kernel"), "bias": take(f"{prefix}/bias")}


def _layer_norm(take, prefix: str) -> dict:
    return {"scale": take(f"{prefix}/scale"), "bias": take(f"{prefix}/bias")}


def _attention(take, prefix: str) -> dict:  # flax's layout is bigalign's: [W, heads, kv] ...
    return {name: _dense(take, f"{prefix}/{name}") for name in ("query", "key", "value", "out")}


def _mlp(take, prefix: str) -> dict:
    return {"fc1": _dense(take, f"{prefix}/Dense_0"), "fc2": _dense(take, f"{prefix}/Dense_1")}


def _block(take, prefix: str) -> dict:
    return {"ln_attention": _layer_norm(take, f"{prefix}/LayerNorm_0"),
            "attention": _attention(take, f"{prefix}/MultiHeadDotProductAttention_0"),
            "ln_mlp": _layer_norm(take, f"{prefix}/LayerNorm_1"),
            "mlp": _mlp(take, f"{prefix}/MlpBlock_0")}


def _encoder(take, state: dict, prefix: str, like: dict) -> dict:
    """The blocks (stacked or not, in the checkpoint and in the model) and encoder_norm."""
    if f"{prefix}/encoderblock/LayerNorm_0/scale" in state:
        stacked = _block(take, f"{prefix}/encoderblock")
        depth = stacked["ln_attention"]["scale"].shape[0]
        blocks = [_take_layer(stacked, i) for i in range(depth)]
    else:
        depth = sum(name.startswith(f"{prefix}/encoderblock_") and name.endswith("/LayerNorm_0/scale")
                    for name in state)
        blocks = [_block(take, f"{prefix}/encoderblock_{i}") for i in range(depth)]
    return {**model_blocks(blocks, like), "ln_final": _layer_norm(take, f"{prefix}/encoder_norm")}


def _take_layer(stacked: dict, index: int) -> dict:
    return {k: _take_layer(v, index) if isinstance(v, dict) else v[index] for k, v in stacked.items()}


def _map_head(take, prefix: str) -> dict:
    return {"probe": take(f"{prefix}/probe"),
            "attention": _attention(take, f"{prefix}/MultiHeadDotProductAttention_0"),
            "ln": _layer_norm(take, f"{prefix}/LayerNorm_0"), "mlp": _mlp(take, f"{prefix}/MlpBlock_0")}


def _tower(take, state: dict, prefix: str, encoder: dict, like: dict) -> dict:
    """{"encoder", "projection"} of tower `prefix` ("img"/"txt") around its `encoder` params."""
    if f"{prefix}/MAPHead_0/probe" in state:
        encoder["map_head"] = _map_head(take, f"{prefix}/MAPHead_0")
    tower = {"encoder": encoder}
    if "projection" in like:
        tower["projection"] = _dense(take, f"{prefix}/head")
    return tower


def params_from_big_vision(state: dict[str, np.ndarray], like, source: str = "big_vision") -> dict:
    """bigalign params for a two-tower ("image", "text") model shaped like `like`, from a
    big_vision SigLIP checkpoint's arrays (`read_npz`)."""
    take = TensorTaker(state, source)
    image_encoder = {
        "patch_embed": _dense(take, "img/embedding"),
        "position_embedding": take("img/pos_embedding"),
        "encoder": _encoder(take, state, "img/Transformer", like["image"]["encoder"]["encoder"]),
    }
    if "img/cls" in state:
        image_encoder["cls_token"] = take("img/cls")
    positions = take("txt/pos_embedding")
    if "txt/Encoder_0/pos_embedding" in state:  # older checkpoints add it twice (big_vision's load)
        positions = positions + take("txt/Encoder_0/pos_embedding")
    text_encoder = {
        "token_embed": {"embedding": take("txt/Embed_0/embedding")},
        "position_embedding": positions,
        "encoder": _encoder(take, state, "txt/Encoder_0", like["text"]["encoder"]["encoder"]),
    }
    params = {
        "image": _tower(take, state, "img", image_encoder, like["image"]),
        "text": _tower(take, state, "txt", text_encoder, like["text"]),
        "logit_scale": take("t").reshape(()),
        "logit_bias": take("b").reshape(()) if "b" in state else np.zeros((), np.float32),
    }
    check_complete(params, like, take)
    return params
