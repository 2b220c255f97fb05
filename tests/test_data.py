"""Tests for bigalign.data: the shapes source, the tokenizer, and the grain pipelines."""

import importlib.util
import os
import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigalign.data import audio, pipeline, synthetic, tokenizer as tokenizer_lib
from bigalign.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 128  # enough for whole-word pieces on the shapes captions


def random_seed() -> int:
    return int(np.random.randint(0, 2**31 - 1))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    return tokenizer_lib.train_tokenizer(synthetic.caption_corpus(), str(path), VOCAB_SIZE)


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


# --- tokenizer --------------------------------------------------------------------


def test_encode_appends_eos_and_pads(tokenizer):
    texts = list(np.random.choice(synthetic.caption_corpus(), size=16, replace=False))
    ids = tokenizer.encode(texts, max_len=16)
    assert ids.shape == (16, 16) and ids.dtype == np.int32
    assert tokenizer.pad_id == 0 and tokenizer.eos_id > 0
    lengths = (ids != tokenizer.pad_id).sum(axis=1)
    for row, length in zip(ids, lengths):
        assert row[length - 1] == tokenizer.eos_id  # EOS is the last real token
        assert np.all(row[length:] == tokenizer.pad_id)  # right padding
        assert np.sum(row == tokenizer.eos_id) == 1
    assert tokenizer.decode(ids) == texts  # nothing was cut


def test_every_shapes_caption_fits_the_demo_length(tokenizer):
    ids = tokenizer.encode(synthetic.caption_corpus(), max_len=64)
    assert (ids != 0).sum(axis=1).max() <= 16


def test_truncation_keeps_eos_last(tokenizer):
    text = " ".join(np.random.choice(synthetic.caption_corpus(), size=4))
    full = tokenizer.encode([text], max_len=128)[0]
    num_pieces = int((full != 0).sum()) - 1
    for max_len in (1, 2, num_pieces // 2):
        ids = tokenizer.encode([text], max_len=max_len)[0]
        np.testing.assert_array_equal(ids[:-1], full[: max_len - 1])
        assert ids[-1] == tokenizer.eos_id
    empty = tokenizer.encode([""], max_len=4)[0]
    np.testing.assert_array_equal(empty, [tokenizer.eos_id, 0, 0, 0])


def test_reload_and_pickle_give_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "copy.model"
    path.write_bytes(tokenizer.model_proto)
    texts = list(np.random.choice(synthetic.caption_corpus(), size=8))
    expected = tokenizer.encode(texts, max_len=12)
    for other in (tokenizer_lib.Tokenizer.load(str(path)), pickle.loads(pickle.dumps(tokenizer))):
        assert other.vocab_size == tokenizer.vocab_size
        np.testing.assert_array_equal(other.encode(texts, max_len=12), expected)


def test_training_is_deterministic_and_quiet(tmp_path, capfd):
    texts = synthetic.caption_corpus()
    first = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "a.model"), 100)
    second = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "b.model"), 100)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert first.model_proto == second.model_proto
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temporary left over
    assert capfd.readouterr() == ("", "")


def test_training_works_without_a_real_stderr(tmp_path, capsys):
    # Under pytest's capsys (or in notebooks) sys.stderr has no file descriptor.
    tokenizer_lib.train_tokenizer(synthetic.caption_corpus(), str(tmp_path / "t.model"), 64)
    assert (tmp_path / "t.model").exists()


def test_too_small_vocabulary_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="training the tokenizer .* failed: .*vocab") as error:
        tokenizer_lib.train_tokenizer(synthetic.caption_corpus(), str(tmp_path / "t.model"), 5)
    assert "\n" not in str(error.value) and not (tmp_path / "t.model").exists()


def test_missing_model_error_says_how_to_create_it(tmp_path):
    path = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="missing.model.*train_tokenizer.py"):
        tokenizer_lib.Tokenizer.load(path)


def test_load_or_train_trains_once(tmp_path):
    path = str(tmp_path / "nested" / "tok.model")
    calls = []

    def texts():
        calls.append(1)
        return synthetic.caption_corpus()

    first = tokenizer_lib.load_or_train(path, texts, VOCAB_SIZE)
    second = tokenizer_lib.load_or_train(path, texts, VOCAB_SIZE)
    assert len(calls) == 1 and first.model_proto == second.model_proto


def test_command_line_tool(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer_tool", os.path.join(REPO, "tools", "train_tokenizer.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    texts = ["the quick brown fox", "jumps over the lazy dog", "", "the end"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    output = tmp_path / "tok.model"
    status = tool.main(["--input", str(tmp_path / "texts.txt"), "--output", str(output),
                        "--vocab_size", "40"])
    assert status == 0
    model = tokenizer_lib.Tokenizer.load(str(output))
    assert model.decode(model.encode(texts, max_len=32)) == texts


# --- pipelines --------------------------------------------------------------------


def small_config(**overrides):
    config = pipeline.default_config()
    config.image_size, config.num_train, config.num_eval = 16, 96, 48
    config.seed = random_seed()
    config.update(overrides)
    return config


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_default_config_keys():
    config = pipeline.default_config()
    assert set(config.keys()) == {
        "name", "image_size", "num_train", "num_eval", "seed", "num_workers", "augment", "audio"
    }
    assert set(config.audio.keys()) == {
        "sample_rate", "clip_seconds", "num_mel_bins", "frame_length", "hop_length"
    }


def test_input_shapes_per_modality():
    shapes = pipeline.input_shapes(pipeline.default_config(), max_len=16)
    assert shapes == {"image": (32, 32, 3), "text": (16,), "audio": (32, 32)}
    assert tuple(shapes) == pipeline.MODALITIES
    config = small_config()
    config.audio.update(clip_seconds=1.0, num_mel_bins=20, frame_length=400, hop_length=160)
    assert pipeline.input_shapes(config, max_len=8)["audio"] == (48, 20)  # 1 + 7600 // 160
    config.audio.clip_seconds = 0.04
    with pytest.raises(UserError, match="shorter than one frame"):
        pipeline.input_shapes(config, max_len=8)


def test_train_batches_have_model_shapes(tokenizer):
    config = small_config()
    dataset = pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=1)
    for batch in take(iter(dataset), 3):
        assert batch.keys() == {"image", "text"}
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["text"].shape == (8, 12) and batch["text"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert np.all((batch["text"] == tokenizer.eos_id).sum(axis=1) == 1)


ALL = ("image", "text", "audio")


def test_audio_batches_have_model_shapes(tokenizer):
    config = small_config()
    shapes = pipeline.input_shapes(config, max_len=12)
    for modalities in (ALL, ("audio", "text")):
        dataset = pipeline.train_dataset(
            config, tokenizer, max_len=12, global_batch_size=8, seed=1, modalities=modalities
        )
        for batch in take(iter(dataset), 3):
            assert batch.keys() == set(modalities)
            for modality in modalities:
                assert batch[modality].shape == (8, *shapes[modality])
            assert batch["audio"].shape == (8, 32, 32) and batch["audio"].dtype == np.float32
            assert np.all(np.isfinite(batch["audio"]))
            # Standardised by fixed constants: about zero mean and unit scale.
            assert abs(batch["audio"].mean()) < 0.5 and 0.5 < batch["audio"].std() < 1.5


def test_image_text_pipelines_do_not_synthesise_sounds(tokenizer, monkeypatch):
    def no_sounds(*args, **kwargs):
        raise AssertionError("a sound was synthesised")

    monkeypatch.setattr(synthetic, "render_audio", no_sounds)
    config = small_config()
    dataset = pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=1)
    assert next(iter(dataset)).keys() == {"image", "text"}
    assert pipeline.eval_data(config, tokenizer, max_len=12)["inputs"].keys() == {"image", "text"}


def test_unknown_modality_is_a_one_line_error(tokenizer):
    config = small_config()
    for modalities, problem in ((("image", "video"), r"unknown modalities \['video'\]"),
                                ((), "no modalities")):
        expected = f"{problem} for data.name='shapes'; valid: image, text, audio"
        with pytest.raises(UserError, match=expected):
            pipeline.train_dataset(config, tokenizer, max_len=8, global_batch_size=8, seed=0,
                                   modalities=modalities)
        with pytest.raises(UserError, match=expected):
            pipeline.eval_data(config, tokenizer, max_len=8, modalities=modalities)


def test_audio_augmentation_is_a_small_gain(tokenizer):
    make = lambda augment: next(iter(pipeline.train_dataset(  # noqa: E731
        small_config(augment=augment, seed=seed), tokenizer, max_len=8, global_batch_size=8,
        seed=2, modalities=("audio",),
    )))["audio"]
    seed = random_seed()
    plain, augmented = make(False), make(True)
    # A gain g adds 2 ln(g) / AUDIO_LOG_MEL_STD wherever the energy is far above the floor.
    loud = plain * pipeline.AUDIO_LOG_MEL_STD + pipeline.AUDIO_LOG_MEL_MEAN > -8  # tone bins
    shifts = [(a - p)[mask] for a, p, mask in zip(augmented, plain, loud)]
    limit = 2 * np.log(10 ** (pipeline.AUDIO_GAIN_DB / 20)) / pipeline.AUDIO_LOG_MEL_STD
    for shift in shifts:
        assert shift.size and np.ptp(shift) < 5e-3 and abs(shift.mean()) <= limit + 5e-3
    assert len({round(float(shift.mean()), 4) for shift in shifts}) > 1


def test_train_stream_is_deterministic_and_seeded(tokenizer):
    config = small_config()
    make = lambda seed: iter(  # noqa: E731
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=seed)
    )
    seed = random_seed()
    first, second, other = take(make(seed), 5), take(make(seed), 5), take(make(seed + 1), 5)
    assert_batches_equal(first, second)
    assert not np.array_equal(first[0]["text"], other[0]["text"])


def test_epochs_are_permutations_in_different_orders(tokenizer):
    config = small_config(num_train=32, augment=False)
    dataset = pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=3)
    batches = take(iter(dataset), 8)  # two epochs of 4 batches
    epochs = [np.concatenate([b["image"] for b in batches[i : i + 4]]) for i in (0, 4)]
    source = synthetic.ShapesSource("train", 32, 16, config.seed)
    all_images = pipeline.normalise_images(np.stack([source[i]["image"] for i in range(32)]))
    keys = lambda images: sorted(x.tobytes() for x in images)  # noqa: E731
    assert keys(epochs[0]) == keys(epochs[1]) == keys(all_images)
    assert not np.array_equal(epochs[0], epochs[1])


def test_processes_read_interleaved_shards(tokenizer, monkeypatch):
    config = small_config(augment=False)
    make = lambda batch: iter(  # noqa: E731
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=batch, seed=5)
    )
    whole = next(make(8))["text"]  # one process, global batch 8
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    shards = []
    for index in range(2):
        monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
        shards.append(next(make(8))["text"])  # each process: 4 of the global 8
    assert shards[0].shape == (4, 12)
    np.testing.assert_array_equal(whole[0::2], shards[0])
    np.testing.assert_array_equal(whole[1::2], shards[1])

    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="batch_size=8"):
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=5)


def test_unknown_dataset_name_lists_valid_ones(tokenizer):
    with pytest.raises(ValueError, match="unknown data.name 'coco'.*shapes"):
        pipeline.train_dataset(
            small_config(name="coco"), tokenizer, max_len=8, global_batch_size=8, seed=0
        )


@pytest.mark.parametrize(
    "num_workers, modalities", [(0, ("image", "text")), (0, ALL), (1, ALL)]
)
def test_resume_from_iterator_state_replays_the_same_batches(tokenizer, num_workers, modalities):
    config = small_config(num_workers=num_workers)
    make = lambda: iter(  # noqa: E731
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=7,
                               modalities=modalities)
    )
    before, after = np.random.randint(1, 20), np.random.randint(1, 10)
    uninterrupted = take(make(), before + after)

    interrupted = make()
    head = take(interrupted, before)
    state = interrupted.get_state()
    resumed = make()
    resumed.set_state(state)
    tail = take(resumed, after)
    assert_batches_equal(uninterrupted, head + tail)
    for iterator in (interrupted, resumed):
        if hasattr(iterator, "close"):
            iterator.close()


def test_resume_through_an_orbax_checkpoint(tokenizer, tmp_path):
    config = small_config()
    make = lambda: iter(  # noqa: E731
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8, seed=11)
    )
    before, after = np.random.randint(1, 20), np.random.randint(1, 10)
    uninterrupted = take(make(), before + after)

    checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    interrupted = make()
    head = take(interrupted, before)
    checkpointer.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(interrupted))
    take(interrupted, 3)  # moves on; the checkpoint must not
    resumed = make()
    checkpointer.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(resumed))
    assert_batches_equal(uninterrupted, head + take(resumed, after))


@pytest.mark.parametrize("modalities", [("image", "text"), ALL, ("audio", "text")])
def test_eval_data_matches_the_held_out_split(tokenizer, modalities, monkeypatch):
    monkeypatch.setattr(pipeline, "EVAL_CHUNK", 20)  # several chunks, the last one partial
    config = small_config()
    data = pipeline.eval_data(config, tokenizer, max_len=16, modalities=modalities)
    n, classes = config.num_eval, synthetic.NUM_CLASSES
    assert data.keys() == {"inputs", "labels", "class_texts", "class_names"}
    inputs = data["inputs"]
    assert inputs.keys() == set(modalities)
    shapes = pipeline.input_shapes(config, max_len=16)
    for modality in modalities:
        assert inputs[modality].shape == (n, *shapes[modality])
        assert inputs[modality].dtype == (np.int32 if modality == "text" else np.float32)
    assert data["labels"].shape == (n,) and data["labels"].dtype == np.int32
    num_prompts = len(synthetic.class_prompts(0))
    assert data["class_texts"].shape == (classes, num_prompts, 16)
    assert data["class_names"] == synthetic.CLASS_NAMES

    source = audio_source("eval", n, seed=config.seed)
    i = int(np.random.randint(n))
    example = source[i]
    assert data["labels"][i] == example["label"]
    assert tokenizer.decode(inputs["text"][i : i + 1]) == [example["caption"]]
    if "image" in modalities:
        np.testing.assert_array_equal(
            inputs["image"][i], pipeline.normalise_images(example["image"])
        )
    if "audio" in modalities:
        expected = pipeline.normalise_audio(
            example["audio"][None], pipeline._spectrogram_options(config)
        )[0]
        np.testing.assert_allclose(inputs["audio"][i], expected, atol=1e-5)
    label = int(np.random.randint(classes))
    assert tokenizer.decode(data["class_texts"][label]) == synthetic.class_prompts(label)


def test_tokenizer_corpus_holds_every_caption():
    corpus = set(pipeline.tokenizer_corpus(small_config()))
    source = synthetic.ShapesSource("train", 1000, 8, random_seed())
    assert all(source[i]["caption"] in corpus for i in np.random.randint(0, 1000, size=50))
