"""Tests for bigalign.data.synthetic: the shapes images, captions and sounds."""

import numpy as np
import pytest

from bigalign.data import audio, pipeline, synthetic
from bigalign.errors import UserError
from helpers import random_seed


def parse_caption(caption: str) -> dict:
    """The attribute words of a caption, found by matching each vocabulary."""
    words = set(caption.replace(":", " ").split())
    found = {
        "colour": [c for c in synthetic.COLOURS if c in words],
        "shape": [s for s in synthetic.SHAPES if s in words],
        "size": [s for s in synthetic.SIZES if s in words],
        "place": [p for p in synthetic.PLACES if set(p.split()) <= words],
    }
    assert all(len(v) == 1 for v in found.values()), (caption, found)
    return {key: values[0] for key, values in found.items()}


# --- synthetic source ----------------------------------------------------------------


def assert_examples_equal(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"] and a["label"] == b["label"]


def test_source_is_a_pure_function_of_seed_split_and_index():
    seed = random_seed()
    indices = np.random.randint(0, 500, size=8)
    first = synthetic.ShapesSource("train", 500, 32, seed)
    second = synthetic.ShapesSource("train", 500, 32, seed)
    for i in indices:  # also in another order than the first read
        assert_examples_equal(first[i], second[i])
    for i in indices[::-1]:
        assert_examples_equal(first[i], second[i])

    other_seed = synthetic.ShapesSource("train", 500, 32, seed + 1)
    other_split = synthetic.ShapesSource("eval", 500, 32, seed)
    for other in (other_seed, other_split):
        differing = [not np.array_equal(first[i]["image"], other[i]["image"]) for i in indices]
        assert all(differing)


def test_example_types_and_shapes():
    size = int(np.random.choice([16, 32, 48, 224]))
    example = synthetic.ShapesSource("test", 10, size, random_seed())[int(np.random.randint(10))]
    assert example["image"].shape == (size, size, 3) and example["image"].dtype == np.uint8
    assert isinstance(example["caption"], str)
    assert example["label"].dtype == np.int32 and 0 <= example["label"] < synthetic.NUM_CLASSES


def test_caption_words_match_the_label():
    source = synthetic.ShapesSource("train", 10_000, 16, random_seed())
    for i in np.random.randint(0, len(source), size=200):
        example = source[i]
        words = parse_caption(example["caption"])
        assert synthetic.CLASS_NAMES[example["label"]] == f"{words['colour']} {words['shape']}"


def named_colour_counts(image: np.ndarray, tolerance: float = 45.0) -> dict:
    """Number of pixels within `tolerance` (max over channels) of each named colour."""
    pixels = image.astype(np.float32).reshape(-1, 3)
    return {
        name: int((np.abs(pixels - np.array(rgb)).max(axis=1) <= tolerance).sum())
        for name, rgb in synthetic.COLOUR_RGB.items()
    }


@pytest.mark.parametrize("image_size", [32, 96])
def test_rendered_shape_has_the_captioned_colour_and_place(image_size):
    source = synthetic.ShapesSource("train", 1000, image_size, random_seed())
    for i in np.random.randint(0, len(source), size=40):
        example = source[i]
        words = parse_caption(example["caption"])
        counts = named_colour_counts(example["image"])
        assert max(counts, key=counts.get) == words["colour"], (example["caption"], counts)
        assert counts[words["colour"]] >= 4

        rgb = np.array(synthetic.COLOUR_RGB[words["colour"]])
        mask = np.abs(example["image"].astype(np.float32) - rgb).max(axis=-1) <= 45
        rows, cols = np.nonzero(mask)
        centre = np.array([rows.mean(), cols.mean()]) / image_size  # fractions of the side
        if words["place"] == "center":
            assert np.all(np.abs(centre - 0.5) < 0.15), (example["caption"], centre)
        else:
            vertical, horizontal = words["place"].split()
            assert (centre[0] < 0.5) == (vertical == "top"), (example["caption"], centre)
            assert (centre[1] < 0.5) == (horizontal == "left"), (example["caption"], centre)


def test_classes_are_roughly_balanced():
    source = synthetic.ShapesSource("eval", 2400, 8, random_seed())
    labels = np.array([source[i]["label"] for i in range(len(source))])
    counts = np.bincount(labels, minlength=synthetic.NUM_CLASSES)
    assert counts.min() >= 50 and counts.max() <= 150  # expected 100 each


def test_source_rejects_bad_split_and_index():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        synthetic.ShapesSource("validation", 10, 32, 0)
    source = synthetic.ShapesSource("train", 10, 32, 0)
    for index in (10, -1, 10**9):
        with pytest.raises(ValueError, match="out of range"):
            source[index]
        with pytest.raises(IndexError):
            source[index]


def test_class_prompts_cover_every_caption_equally():
    prompts = [synthetic.class_prompts(label) for label in range(synthetic.NUM_CLASSES)]
    assert len(set(map(len, prompts))) == 1
    corpus = synthetic.caption_corpus()
    assert len(corpus) == len(set(corpus)) == sum(map(len, prompts))
    for label, group in enumerate(prompts):
        for prompt in group:
            words = parse_caption(prompt)
            assert f"{words['colour']} {words['shape']}" == synthetic.CLASS_NAMES[label]
    source = synthetic.ShapesSource("train", 1000, 8, random_seed())
    for i in np.random.randint(0, len(source), size=50):
        example = source[i]
        assert example["caption"] in prompts[example["label"]]


# --- synthetic sounds ---------------------------------------------------------------


AUDIO = pipeline.default_config().audio
CLIP_SAMPLES = round(AUDIO.clip_seconds * AUDIO.sample_rate)


def audio_source(split="train", num_examples=1000, seed=None) -> synthetic.ShapesSource:
    return synthetic.ShapesSource(
        split, num_examples, 16, random_seed() if seed is None else seed, with_audio=True,
        sample_rate=AUDIO.sample_rate, clip_samples=CLIP_SAMPLES,
    )


def log_mel(waveforms: np.ndarray) -> np.ndarray:
    """[N, S] -> the demo's (unnormalised) log-mel spectrograms [N, frames, mels]."""
    return audio.log_mel_spectrogram(
        waveforms, sample_rate=AUDIO.sample_rate, num_mel_bins=AUDIO.num_mel_bins,
        frame_length=AUDIO.frame_length, hop_length=AUDIO.hop_length,
    )


def mel_bin(hz: float) -> int:
    """The demo's mel bin whose centre is nearest `hz` (in mel)."""
    centres = audio.hz_to_mel(audio.mel_bin_centres(AUDIO.num_mel_bins, AUDIO.sample_rate))
    return int(np.argmin(np.abs(centres - audio.hz_to_mel(hz))))


def sounds_with_attributes(count: int) -> tuple[np.ndarray, list[dict]]:
    """Log-mels [count, frames, mels] of random examples, and their caption's attributes."""
    source = audio_source()
    examples = [source[i] for i in np.random.choice(len(source), count, replace=False)]
    spectrograms = log_mel(np.stack([e["audio"] for e in examples]))
    return spectrograms, [parse_caption(e["caption"]) for e in examples]


def test_sounds_are_a_pure_function_of_seed_split_and_index_and_leave_images_alone():
    seed = random_seed()
    first, second = audio_source(seed=seed), audio_source(seed=seed)
    silent = synthetic.ShapesSource("train", 1000, 16, seed)
    indices = np.random.randint(0, 1000, size=6)
    for i in list(indices) + list(indices[::-1]):
        example = first[i]
        assert example["audio"].shape == (CLIP_SAMPLES,) and example["audio"].dtype == np.float32
        assert np.all(np.isfinite(example["audio"])) and np.abs(example["audio"]).max() < 2
        np.testing.assert_array_equal(example["audio"], second[i]["audio"])
        assert "audio" not in silent[i]
        assert_examples_equal(example, silent[i])  # the image draws are untouched
    others = (audio_source(seed=seed + 1), audio_source("eval", seed=seed))
    for other in others:
        assert all(not np.array_equal(first[i]["audio"], other[i]["audio"]) for i in indices)


def test_pitch_names_the_colour():
    spectrograms, attributes = sounds_with_attributes(200)
    loudest_bin = spectrograms.max(axis=1).argmax(axis=-1)  # [N]: the fundamental's bin
    pitch_bins = {colour: mel_bin(hz) for colour, hz in synthetic.PITCH_HZ.items()}
    assert len(set(pitch_bins.values())) == len(synthetic.COLOURS)
    for found, words in zip(loudest_bin, attributes):
        nearest = min(pitch_bins, key=lambda colour: abs(pitch_bins[colour] - found))
        assert nearest == words["colour"], (found, words)


def test_harmonics_name_the_shape():
    spectrograms, attributes = sounds_with_attributes(300)
    peaks = spectrograms.max(axis=1)  # [N, mels]: each bin's level while the tone plays
    overtones = {shape: [] for shape in synthetic.SHAPES}  # shape -> [(2nd, 3rd)] vs fundamental
    for levels, words in zip(peaks, attributes):
        pitch = synthetic.PITCH_HZ[words["colour"]]
        fundamental = levels[mel_bin(pitch)]
        overtones[words["shape"]].append(
            (levels[mel_bin(2 * pitch)] - fundamental, levels[mel_bin(3 * pitch)] - fundamental)
        )
    second, third = {}, {}
    for shape, values in overtones.items():
        second[shape], third[shape] = np.median(values, axis=0)
    # cross (all harmonics, 1/k): a strong 2nd harmonic; the others have only odd ones.
    assert second["cross"] > -3 and max(second[s] for s in ("circle", "square", "triangle")) < -5
    # 3rd harmonic: square (1/3) > triangle (1/9) > circle (none, just noise).
    assert third["square"] > third["triangle"] + 1 > third["circle"] + 2, third


def test_loudness_names_the_size_and_onset_the_place():
    spectrograms, attributes = sounds_with_attributes(300)
    peaks = {size: [] for size in synthetic.SIZES}
    onsets = {place: [] for place in synthetic.PLACES}
    for spectrogram, words in zip(spectrograms, attributes):
        track = spectrogram[:, mel_bin(synthetic.PITCH_HZ[words["colour"]])]  # [frames]
        peaks[words["size"]].append(track.max())
        onsets[words["place"]].append(np.argmax(track > (track.max() + track.min()) / 2))
    # Large tones are 2.5 times the amplitude of small ones: log power + 1.8.
    assert np.median(peaks["large"]) > np.median(peaks["small"]) + 1
    in_onset_order = sorted(synthetic.PLACES, key=synthetic.PLACE_ONSET.get)
    assert np.all(np.diff([np.median(onsets[place]) for place in in_onset_order]) >= 2)


def test_audio_source_rejects_a_too_low_sample_rate():
    with pytest.raises(UserError, match="sample_rate=4000 is too low.*at least"):
        synthetic.ShapesSource("train", 10, 16, 0, with_audio=True, sample_rate=4000)
    synthetic.ShapesSource("train", 10, 16, 0, sample_rate=4000)  # no sounds: no check


