"""Image decoding and the two views a model sees: a random-resized crop for training, a centre crop for eval.

Both views are one PIL resize from a box of the decoded image straight to
[size, size], antialiased (PIL widens the filter when it shrinks). A JPEG is
decoded at a reduced scale (`draft`) when it is much larger than needed, which
is most of the decoding cost on web-scale data.

- `train_view`: a box of random area (a fraction `scale` of the image) and aspect
  ratio (log-uniform in `ratio`), as in Inception / CLIP training, then an optional
  horizontal flip.
- `eval_view`: the largest centred square, resized to [size, size]: the same as
  "resize the shorter side to size, then centre-crop".
"""

import io
import math
import os

import numpy as np
from PIL import Image

from bigalign.data.skipping import UnreadableExample

# Attempts at drawing a random box that fits before falling back to the centre box.
CROP_ATTEMPTS = 10
RESAMPLE = Image.Resampling.BILINEAR


class ImageError(UnreadableExample):
    """An image that cannot be read: missing, truncated, not an image. The message says which."""


def load(image, *, min_side: int) -> Image.Image:
    """An RGB PIL image from a PIL image, a uint8 array [H, W(, C)], encoded bytes, or a file path.

    JPEGs are decoded at the smallest scale that keeps both sides >= min_side.
    Raises ImageError naming the problem.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        return Image.fromarray(np.asarray(array, np.uint8)).convert("RGB")
    try:
        opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else os.fspath(image))
        with opened:
            opened.draft("RGB", (min_side, min_side))
            return opened.convert("RGB")  # decodes the whole file: truncation fails here
    except FileNotFoundError:
        raise ImageError("missing file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL raises OSError for truncated data, SyntaxError for some broken headers.
        raise ImageError(f"unreadable image ({type(error).__name__}: {error})") from None


def random_box(width: int, height: int, rng: np.random.Generator, scale, ratio) -> tuple:
    """(left, top, right, bottom): area a fraction `scale` of the image, aspect w/h in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        box_width = math.sqrt(target_area * aspect)
        box_height = math.sqrt(target_area / aspect)
        if box_width <= width and box_height <= height:
            left = rng.uniform(0, width - box_width)
            top = rng.uniform(0, height - box_height)
            return (left, top, left + box_width, top + box_height)
    # Extreme aspect ratios: the whole image, clamped to the allowed ratios, centred.
    aspect = min(max(width / height, ratio[0]), ratio[1])
    box_width, box_height = min(width, height * aspect), min(height, width / aspect)
    left, top = (width - box_width) / 2, (height - box_height) / 2
    return (left, top, left + box_width, top + box_height)


def centre_box(width: int, height: int) -> tuple:
    """The largest centred square."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def train_view(image, size: int, rng: np.random.Generator, *, scale=(0.9, 1.0),
               ratio=(3 / 4, 4 / 3), flip: bool = True) -> np.ndarray:
    """A random-resized crop (and, with `flip`, a coin-flip mirror): uint8 [size, size, 3]."""
    # Decode at a resolution where even the smallest box still has `size` pixels per side.
    picture = load(image, min_side=math.ceil(size / math.sqrt(scale[0])))
    box = random_box(*picture.size, rng, scale, ratio)
    view = np.asarray(picture.resize((size, size), RESAMPLE, box=box))
    if flip and rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def eval_view(image, size: int) -> np.ndarray:
    """The centred square resized to uint8 [size, size, 3]."""
    picture = load(image, min_side=size)
    return np.asarray(picture.resize((size, size), RESAMPLE, box=centre_box(*picture.size)))
