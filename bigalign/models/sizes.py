"""Named Transformer sizes, as in the ViT literature ("B/16" = base width, 16-pixel patches).

Ti/S/B/L/H from Dosovitskiy et al. (2021) and Touvron et al. (2021), g and G
from Zhai et al. (2022, "Scaling Vision Transformers"), So400m (shape-optimised)
from Alabdulmohsin et al. (2023), M as big_vision defines it. Text towers use the same
table, as SigLIP does: a "B" text tower has the B width, depth, heads and MLP.
"""

from typing import Optional


def _dims(width: int, depth: int, num_heads: int, mlp_dim: int) -> dict:
    return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim)


VARIANTS = {
    "Ti": _dims(192, 12, 3, 768),
    "S": _dims(384, 12, 6, 1536),
    "M": _dims(512, 12, 8, 2048),
    "B": _dims(768, 12, 12, 3072),
    "L": _dims(1024, 24, 16, 4096),
    "So400m": _dims(1152, 27, 16, 4304),
    "H": _dims(1280, 32, 16, 5120),
    "g": _dims(1408, 40, 16, 6144),
    "G": _dims(1664, 48, 16, 8192),
}


def parse_variant(variant: str) -> tuple[dict, Optional[int]]:
    """Splits a size name into its dims and patch size: "B/16" -> (B's dims, 16), "B" -> (B's dims, None).

    Names are case-sensitive ("g" and "G" are different sizes).
    """
    name, slash, patch = variant.partition("/")
    if name not in VARIANTS:
        raise ValueError(f"unknown model size {name!r} in {variant!r}; valid sizes: {', '.join(VARIANTS)}")
    if slash and not (patch.isdigit() and int(patch) > 0):
        raise ValueError(f"patch size {patch!r} in {variant!r} is not a positive integer (e.g. 'B/16')")
    return dict(VARIANTS[name]), int(patch) if patch else None
