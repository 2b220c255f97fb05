"""Images: uint8 [H, W, 3] pixels at `data.image_size`, scaled to [-1, 1] on the device.

Pixels travel as uint8 (a quarter of float32's bytes through grain workers and
host-to-device); the image tower scales them (`models.vit.normalise_pixels`).
"""

import numpy as np

from bigalign.data import images
from bigalign.errors import UserError
from bigalign.modalities import MODALITIES, Modality


class Image(Modality):
    dtype = np.uint8
    raw_key = "image"

    def input_shape(self, data_config, max_len):
        return (data_config.image_size, data_config.image_size, 3)

    def prepare(self, values, context):
        return values  # uint8, or float already in [-1, 1] (from_user checks which)

    def from_user(self, values, context):
        """uint8 [N, H, W, 3] pixels, or float [N, H, W, 3] already scaled to [-1, 1]."""
        values = np.asarray(values)
        size = context.data_config.image_size
        if values.ndim != 4 or values.shape[-1] != 3:
            raise UserError(f"images must be [N, H, W, 3]; got shape {values.shape} (one image: "
                            f"add a leading axis; other sizes: model.preprocess(picture))")
        if values.shape[1:3] != (size, size):
            raise UserError(f"images must be {size}x{size} for this model; got {values.shape[1:3]}: "
                            f"resize and centre-crop them with model.preprocess(picture)")
        if len(values) == 0:
            raise UserError("no images to embed: pass at least one")
        if values.dtype == np.uint8:
            return values
        if not np.issubdtype(values.dtype, np.floating):
            raise UserError(f"images must be uint8 pixels (0..255) or floats in [-1, 1]; got {values.dtype}")
        low, high = float(values.min()), float(values.max())
        if low < -1 or high > 1:
            raise UserError(f"float images must be scaled to [-1, 1], these span [{low:g}, {high:g}]; "
                            f"pass 0..255 pixels as uint8 instead")
        return values.astype(np.float32)

    def random(self, data_config, max_len, vocab_size, batch_size, rng):
        shape = (batch_size, *self.input_shape(data_config, max_len))
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    @staticmethod
    def preprocess(picture, data_config) -> np.ndarray:
        """The evaluation transform: any picture (a PIL image, a path, encoded bytes or uint8
        [H, W, 3]) -> uint8 [image_size, image_size, 3], resized and centre-cropped."""
        return images.eval_view(picture, data_config.image_size)


MODALITIES.register("image", Image())
