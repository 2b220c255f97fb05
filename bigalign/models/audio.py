"""Audio tower: a Vision Transformer over log-mel spectrograms (AST, Gong et al., 2021).

spectrogram [B, frames, mels] -> non-overlapping (time, frequency) patches ->
linear embedding + learned positions -> pre-LN Transformer -> one vector per
clip [B, width], pooled by `gap`, `cls` or `map` as in `vit`. The spectrogram
is read as a one-channel image, so all of the patch encoder is the ViT's.
"""

from bigalign.models.encoders import ENCODERS, TRANSFORMER_OPTIONS, EncoderKind
from bigalign.models.vit import POOLINGS, VisionTransformer, patch_embedding_flops
from bigalign.schema import Integer, Key


class AudioTransformer(VisionTransformer):
    """`patch_size`: an int (square patches) or (frames, mels) per patch; leftover frames are dropped."""

    def as_image(self, spectrograms):
        return spectrograms[..., None]  # [B, frames, mels] -> [B, frames, mels, 1]


ENCODERS.register("audio", EncoderKind(
    AudioTransformer, options=dict(**TRANSFORMER_OPTIONS, patch_size=Key(4, Integer(low=1)), pool="gap"),
    poolings=POOLINGS,
    embedding_flops=lambda tower, shape: patch_embedding_flops(tower, shape, channels=1),
))
