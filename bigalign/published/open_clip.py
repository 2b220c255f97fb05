"""open_clip and OpenAI CLIP ViT models: their config, and their state dict as bigalign params.

open_clip's ViT CLIP (open_clip/transformer.py, model.py, read for the facts):
image: conv1 (no bias) -> [class_embedding; patches] + positional_embedding ->
ln_pre -> residual blocks (ln_1, attn with packed q/k/v `in_proj`, ln_2, mlp c_fc ->
GELU -> c_proj) -> ln_post on every token -> the class token -> @ visual.proj.
text: token_embedding + positional_embedding -> the same blocks under a causal mask
-> ln_final -> the token at argmax(ids) (the end-of-text id, the largest) -> @
text_projection. LayerNorm eps 1e-5 (torch's), exact GELU (QuickGELU for OpenAI's
weights: the "-quickgelu" names), a learned log logit scale clamped at log 100,
OpenAI's pixel mean/std, 64-wide attention heads.

In bigalign that is a ViT with `pool="cls"`, `ln_pre`, no patch bias, `pixel_norm="clip"`
and a causal text tower with `last` pooling (the same token when the end-of-text id
ends the ids, as the CLIP tokenizer writes them); the class token absorbs its
position (class_embedding + positional_embedding[0]). The sizes (width, depth, MLP,
patch, image size, vocabulary, context, embedding) are read from the tensors' shapes.
No torch is needed for .safetensors files.
"""

import math
import re

import ml_collections
import numpy as np

from bigalign import config as config_lib
from bigalign.errors import UserError
from bigalign.published.tensors import TensorTaker, check_complete, encoder_shape, model_blocks

# The ViT CLIPs whose attention heads are 64 wide in both towers (open_clip's
# model_configs; ViT-g and ViT-bigG use other head widths, SigLIP ones timm towers).
SUPPORTED_NAMES = re.compile(r"ViT-(S|M|B|L|H)-(14|16|32)(-\d+)?(-quickgelu)?")
HEAD_WIDTH = 64
OPENAI_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of an open_clip checkpoint: .safetensors (NumPy only) or .pt/.bin
    (torch, `weights_only=True`: a pickle that needs more than tensors is refused)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        state = load_file(path)
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            import torch
        except ImportError:
            raise UserError(f"reading {path} needs torch (pip install -e '.[compare]'), or "
                            f"convert it to .safetensors first") from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError and others
            raise UserError(f"{path} is not a plain tensor file ({type(error).__name__}); "
                            f"bigalign loads only weights_only pickles, since a pickle can "
                            f"run code: save its state_dict, or as .safetensors") from None
        if isinstance(loaded, dict) and "state_dict" in loaded:  # an open_clip training checkpoint
            loaded = loaded["state_dict"]
        state = {name: tensor.float().numpy() for name, tensor in loaded.items()}
    else:
        raise UserError(f"{path}: expected a .safetensors, .pt, .pth or .bin file")
    return {name.removeprefix("module."): value for name, value in state.items()}


def model_config(name: str, shapes: dict[str, tuple]) -> ml_collections.ConfigDict:
    """A config of open_clip model `name` ("ViT-B-32", "ViT-L-14-quickgelu", ...) whose
    sizes come from the checkpoint's tensor `shapes`; tokenizer: CLIP's BPE."""
    if not SUPPORTED_NAMES.fullmatch(name):
        raise UserError(f"open_clip model {name!r} is not supported; supported: ViT-S/M/B/L/H "
                        f"with patch 14, 16 or 32 (optionally -<image size>, -quickgelu)")
    if "visual.conv1.weight" not in shapes:
        raise UserError("this state dict has no visual.conv1.weight: not an open_clip ViT CLIP")
    activation = "quick_gelu" if name.endswith("-quickgelu") else "gelu"

    def blocks(prefix):
        return sum(key.startswith(prefix) and key.endswith(".ln_1.weight") for key in shapes)

    image_width, _, patch, _ = shapes["visual.conv1.weight"]
    grid = math.isqrt(shapes["visual.positional_embedding"][0] - 1)
    vocab_size, text_width = shapes["token_embedding.weight"]
    config = config_lib.base_config()
    config.loss.name = "softmax"
    config.data.image_size = grid * patch
    config.text.update(max_len=shapes["positional_embedding"][0], vocab_size=vocab_size,
                       tokenizer_kind="clip")
    shared = dict(activation=activation, layer_norm_epsilon=1e-5)
    config.model.update(embed_dim=shapes["visual.proj"][1],
                        init_logit_scale=OPENAI_INIT_LOGIT_SCALE, init_logit_bias=0.0,
                        max_logit_scale=MAX_LOGIT_SCALE)
    config.model.image.update(
        width=image_width, depth=blocks("visual.transformer."), num_heads=image_width // HEAD_WIDTH,
        mlp_dim=shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0], patch_size=patch,
        pool="cls", ln_pre="visual.ln_pre.weight" in shapes, patch_bias=False, pixel_norm="clip",
        **shared)
    config.model.text.update(
        width=text_width, depth=blocks("transformer."), num_heads=text_width // HEAD_WIDTH,
        mlp_dim=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0], causal=True, pool="last",
        **shared)
    return config


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


def _encoder(take, prefix: str, like: dict, final_norm: str) -> dict:
    """The blocks under `prefix`.resblocks and the final LayerNorm, laid out like `like`."""
    depth, num_heads = encoder_shape(like)
    blocks = [_block(take, f"{prefix}.resblocks.{i}", num_heads) for i in range(depth)]
    return {**model_blocks(blocks, like), "ln_final": _layer_norm(take, final_norm)}


def params_from_open_clip(state: dict[str, np.ndarray], like, source: str = "open_clip") -> dict:
    """bigalign params for a two-tower ("image", "text") model shaped like `like` (its
    params or ShapeDtypeStructs), from an open_clip CLIP state dict of NumPy arrays."""
    take = TensorTaker(state, source)
    image_like = like["image"]["encoder"]
    positions = take("visual.positional_embedding")  # [1 + patches, W]: the class token's first
    patch_kernel = take("visual.conv1.weight")  # [W, C, p, p]
    patch_embed = {"kernel": patch_kernel.transpose(2, 3, 1, 0)}
    if "bias" in image_like["patch_embed"]:  # a model with a patch bias runs open_clip's as 0
        patch_embed["bias"] = np.zeros(patch_kernel.shape[0], np.float32)
    image_encoder = {
        "patch_embed": patch_embed,
        "cls_token": (take("visual.class_embedding") + positions[0])[None, None],
        "position_embedding": positions[None, 1:],
        "encoder": _encoder(take, "visual.transformer", image_like["encoder"], "visual.ln_post"),
    }
    if "visual.ln_pre.weight" in state:
        image_encoder["ln_pre"] = _layer_norm(take, "visual.ln_pre")
    text_encoder = {
        "token_embed": {"embedding": take("token_embedding.weight")},
        "position_embedding": take("positional_embedding")[None],
        "encoder": _encoder(take, "transformer", like["text"]["encoder"]["encoder"], "ln_final"),
    }
    params = {
        "image": {"encoder": image_encoder, "projection": {"kernel": take("visual.proj")}},
        "text": {"encoder": text_encoder, "projection": {"kernel": take("text_projection")}},
        "logit_scale": take("logit_scale").reshape(()),
        "logit_bias": np.zeros((), np.float32),  # open_clip's CLIP has none (softmax ignores it)
    }
    check_complete(params, like, take)
    return params
