"""Analytic FLOP counts of the towers and of one training step, for MFU and planning.

Convention (as in the ViT scaling and MFU literature): one multiply-add is 2
FLOPs, and only matrix multiplications count: patch/token embeddings, the q, k,
v and output projections, the attention scores QK^T and weighted sum AV, the
MLP, the MAP pooling head and the projection to the shared embedding space.
Elementwise work (LayerNorm, GELU, softmax, residual adds) and embedding
lookups are ignored; they are a few percent of a Transformer's FLOPs. A
backward pass costs twice its forward, so training a tower costs 3x its forward.
"""

from typing import Mapping

from bigalign.models import encoders


def _attention_macs(queries: int, keys: int, width: int) -> int:
    """q and output projections per query, k and v per key, then QK^T and AV."""
    return 2 * queries * width * width + 2 * keys * width * width + 2 * queries * keys * width


def _mlp_macs(tokens: int, width: int, mlp_dim: int) -> int:
    return 2 * tokens * width * mlp_dim


def encoder_forward_flops(tower: Mapping, input_shape: tuple) -> int:
    """FLOPs of one example through a resolved tower's encoder (no projection).

    `tower` is one entry of `towers.resolve_towers` ({"kind", encoder kwargs});
    `input_shape` is one example's, without the batch: (224, 224, 3) for an
    image, (frames, mels) for audio, (max_len,) for text.
    """
    width, mlp_dim = tower["width"], tower["mlp_dim"]
    # The encoder kind counts turning one input into tokens (a patch embedding, a lookup).
    macs, tokens = encoders.get(tower["kind"]).embedding_flops(tower, input_shape)
    block = _attention_macs(tokens, tokens, width) + _mlp_macs(tokens, width, mlp_dim)
    macs += tower["depth"] * block
    if tower["pool"] == "map":  # one learned query attends over all tokens, then an MLP
        macs += _attention_macs(1, tokens, width) + _mlp_macs(1, width, mlp_dim)
    return 2 * macs


def tower_forward_flops(tower: Mapping, input_shape: tuple, embed_dim: int) -> int:
    """FLOPs of one example through a tower: its encoder, then the projection to `embed_dim`."""
    projects = tower.get("projection", "linear") != "none"
    return encoder_forward_flops(tower, input_shape) + 2 * tower["width"] * embed_dim * projects


def train_step_flops(
    forward_flops_per_example: Mapping[str, int],
    frozen: set[str],
    batch_size: int,
    embed_dim: int,
    num_pairs: int,
) -> int:
    """FLOPs of one training step over the global batch.

    Trainable towers run forward and backward (3x forward); frozen towers only
    forward (1x). Each of the `num_pairs` losses multiplies two [B, E] embedding
    matrices into [B, B] logits, forward and backward (3x).
    """
    towers = sum(
        (1 if modality in frozen else 3) * flops * batch_size
        for modality, flops in forward_flops_per_example.items()
    )
    logits = num_pairs * 3 * 2 * batch_size * batch_size * embed_dim
    return towers + logits


# Peak dense bf16 FLOP/s per device, from vendor spec sheets, matched against
# `jax.Device.device_kind` (first match wins). MFU = achieved model FLOP/s / peak.
PEAK_FLOPS_PER_DEVICE = (
    ("TPU v6 lite", 918e12),  # Trillium (v6e)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """The device's peak bf16 FLOP/s, or None where unknown (e.g. CPU: no MFU reported)."""
    for name, peak in PEAK_FLOPS_PER_DEVICE:
        if name in device_kind:
            return peak
    return None
