"""Tests for bigalign.data.images: decoding, the random-resized crop and the centre crop."""

import io

import numpy as np
import pytest
from PIL import Image

from bigalign.data import images
from helpers import random_seed


def random_image(rng, height, width) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_load_reads_arrays_bytes_and_paths_alike(tmp_path):
    rng = np.random.default_rng(random_seed())
    array = random_image(rng, *rng.integers(5, 40, size=2))
    path = tmp_path / "x.png"
    path.write_bytes(encode(array))
    for source in (array, encode(array), str(path)):
        np.testing.assert_array_equal(np.asarray(images.load(source, min_side=8)), array)
    grey = array[..., 0]
    for source in (grey, grey[..., None]):
        loaded = np.asarray(images.load(source, min_side=8))
        assert loaded.shape == (*grey.shape, 3) and np.all(loaded == grey[..., None])


def test_unreadable_images_raise_image_error_saying_why(tmp_path):
    rng = np.random.default_rng(random_seed())
    png = encode(random_image(rng, 64, 64))
    cases = {
        "missing file": str(tmp_path / "nope.png"),
        "unreadable image": png[: len(png) // 2],  # truncated
    }
    for reason, source in cases.items():
        with pytest.raises(images.ImageError, match=reason):
            images.load(source, min_side=8)
    with pytest.raises(images.ImageError, match="unreadable image"):
        images.load(rng.bytes(100), min_side=8)


def test_large_jpegs_are_decoded_at_a_reduced_scale_but_not_below_min_side():
    rng = np.random.default_rng(random_seed())
    jpeg = encode(random_image(rng, 800, 600), "JPEG")
    small = images.load(jpeg, min_side=100)
    assert min(small.size) >= 100 and max(small.size) < 800
    assert images.load(jpeg, min_side=600).size == (600, 800)


def test_random_box_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(random_seed())
    scale, ratio = (0.3, 0.6), (0.5, 2.0)
    for _ in range(200):
        width, height = (int(v) for v in rng.integers(20, 400, size=2))
        left, top, right, bottom = images.random_box(width, height, rng, scale, ratio)
        assert 0 <= left < right <= width + 1e-6 and 0 <= top < bottom <= height + 1e-6
        area, aspect = (right - left) * (bottom - top), (right - left) / (bottom - top)
        if ratio[0] - 1e-9 <= width / height <= ratio[1] + 1e-9 or area < width * height:
            assert ratio[0] - 1e-6 <= aspect <= ratio[1] + 1e-6


def test_random_box_falls_back_to_the_clamped_centre_for_extreme_images():
    rng = np.random.default_rng(random_seed())
    box = images.random_box(1000, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3))  # aspect 100
    left, top, right, bottom = box
    assert np.isclose((right - left) / (bottom - top), 4 / 3)
    assert np.isclose(left + right, 1000) and np.isclose(top + bottom, 10)


def test_train_view_is_a_crop_of_the_image_and_flips_half_the_time():
    rng = np.random.default_rng(random_seed())
    # A horizontal ramp: every column is distinct, so a crop keeps left-to-right order unless flipped.
    ramp = np.broadcast_to(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None], (150, 200, 3))
    flips = 0
    for _ in range(60):
        view = images.train_view(np.ascontiguousarray(ramp), 32, rng, scale=(0.5, 1.0))
        assert view.shape == (32, 32, 3) and view.dtype == np.uint8
        row = view[16, :, 0].astype(int)
        flips += row[0] > row[-1]
    assert 15 <= flips <= 45
    unflipped = images.train_view(np.ascontiguousarray(ramp), 32, rng, flip=False)
    assert unflipped[16, 0, 0] < unflipped[16, -1, 0]


def test_train_view_is_a_pure_function_of_the_rng():
    seed = int(np.random.randint(2**31))
    image = random_image(np.random.default_rng(seed), 120, 90)
    first = images.train_view(image, 24, np.random.default_rng([seed, 1]))
    second = images.train_view(image, 24, np.random.default_rng([seed, 1]))
    np.testing.assert_array_equal(first, second)


def test_eval_view_equals_resize_shorter_side_then_centre_crop():
    rng = np.random.default_rng(random_seed())
    height, width = 64, 128  # the centre square is exactly columns 32..95
    image = random_image(rng, height, width)
    view = images.eval_view(image, 32)
    square = Image.fromarray(image[:, 32:96])
    expected = np.asarray(square.resize((32, 32), images.RESAMPLE))
    # Inside, identical; on the border the box resize also weighs the pixels just outside it.
    np.testing.assert_array_equal(view[1:-1, 1:-1], expected[1:-1, 1:-1])
    assert images.eval_view(image[:, :64], 64).tolist() == image[:, :64].tolist()  # identity
