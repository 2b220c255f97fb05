"""Tests for real-data sources (CSV, tfds, ArrayRecord) through the pipeline, and skipping bad files."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigalign.modalities import audio as audio_modality
from bigalign.data import array_record, held_out, images, pipeline, skipping, sources, waveforms
from bigalign.data.csv_source import CsvSource
from bigalign.data.tfds_source import TfdsSource
from bigalign.errors import UserError
from helpers import random_seed, write_image_folder, write_sound_folder


def csv_config(index: str, **overrides):
    config = pipeline.default_config()
    config.update(name=f"csv:{index}", eval_name=f"csv:{index}", image_size=16, num_eval=12)
    config.update(overrides)
    return config


def take(dataset, count: int) -> list[dict]:
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(count)]
    if hasattr(iterator, "close"):
        iterator.close()
    return batches


@pytest.mark.parametrize("spec", ["coco", "tfds:", "csv", "shapes:x", "array_record:"])
def test_bad_source_specs_list_the_valid_forms(spec):
    with pytest.raises(UserError, match="unknown data source.*'shapes', 'tfds:NAME', 'csv:PATH'"):
        sources.parse(spec)


def test_csv_paths_are_relative_to_the_index(tmp_path):
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path / "data", 5, rng)
    source = CsvSource(index)
    assert len(source) == 5
    i = int(rng.integers(5))
    example = source[i]
    assert example["image"] == example["origin"] == str(tmp_path / "data" / "images" / f"{i:04d}.png")
    row = open(index).read().splitlines()[i + 1]
    assert example["caption"] == row.split(",", 1)[1]


def test_csv_columns_and_separator_are_configurable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "index.tsv").write_text("caption text\timage path\nhello, world\ta.png\n")
    source = CsvSource(str(tmp_path / "index.tsv"), image_column="image path",
                       text_column="caption text")
    assert source[0]["caption"] == "hello, world"
    assert source[0]["image"] == str(tmp_path / "a.png")


def test_csv_errors_name_the_file_and_the_columns(tmp_path):
    with pytest.raises(UserError, match=r"CSV index .*nope.csv' does not exist"):
        CsvSource(str(tmp_path / "nope.csv"))
    (tmp_path / "index.csv").write_text("path,title\na.png,x\n")
    with pytest.raises(UserError, match=r"no column 'filepath' \(found \['path', 'title'\].*"
                                        r"data.csv_image_column"):
        CsvSource(str(tmp_path / "index.csv"))
    (tmp_path / "empty.csv").write_text("filepath,caption\n")
    with pytest.raises(UserError, match="lists no examples"):
        CsvSource(str(tmp_path / "empty.csv"))


def test_csv_train_batches_are_crops_of_the_listed_images(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path, 24, rng)
    config = csv_config(index, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    dataset = pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=8,
                                     seed=int(rng.integers(1000)))
    batches = take(dataset, 6)  # two epochs
    # With full-area square crops and no flip, a training view is the eval view of its file:
    # each epoch (three batches) holds every row once, each image with its own caption.
    rows = [CsvSource(index)[i] for i in range(24)]
    expected = {images.eval_view(row["image"], 16).tobytes(): tokenizer.encode([row["caption"]], 12)[0]
                for row in rows}
    for epoch in (batches[:3], batches[3:]):
        assert all(b["image"].shape == (8, 16, 16, 3) and b["skipped"] == 0 for b in epoch)
        pixels = [image.tobytes() for b in epoch for image in b["image"]]
        assert sorted(pixels) == sorted(expected)
        for key, tokens in zip(pixels, [t for b in epoch for t in b["text"]]):
            np.testing.assert_array_equal(tokens, expected[key])


def test_csv_eval_pairs_are_centre_crops(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path, 20, rng)
    data = held_out.eval_data(csv_config(index), tokenizer, max_len=12)
    assert data.keys() == {"pairs"}  # no labels: no zero-shot
    inputs = data["pairs"]["inputs"]
    assert inputs["image"].shape == (12, 16, 16, 3)  # num_eval caps the 20 rows
    i = int(rng.integers(12))
    example = CsvSource(index)[i]
    np.testing.assert_array_equal(
        inputs["image"][i], images.eval_view(example["image"], 16)
    )
    np.testing.assert_array_equal(inputs["text"][i], tokenizer.encode([example["caption"]], 12)[0])


def test_csv_sounds_give_log_mels_of_resampled_wav_windows(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    index = write_sound_folder(tmp_path, 10, rng)
    config = csv_config(index, csv_image_column="", csv_audio_column="sound")
    assert sources.modalities(config, config.name) == ("text", "audio")
    options = audio_modality.spectrogram_options(config)
    clip_samples = round(config.audio.clip_seconds * config.audio.sample_rate)
    data = held_out.eval_data(config, tokenizer, max_len=12, modalities=("audio", "text"))
    i = int(rng.integers(10))
    waveform = waveforms.load(CsvSource(index, image_column="", audio_column="sound")[i]["audio"],
                              config.audio.sample_rate)
    expected = audio_modality.normalise(waveforms.clip(waveform, clip_samples)[None], options)[0]
    np.testing.assert_allclose(data["pairs"]["inputs"]["audio"][i], expected, atol=1e-5)
    batch = take(pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=4,
                                        seed=0, modalities=("audio", "text")), 1)[0]
    assert batch["audio"].shape == (4, *pipeline.input_shapes(config, max_len=12)["audio"])
    with pytest.raises(UserError, match=r"unknown modalities \['image'\] for data.name='csv:"):
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=4, seed=0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_truncated_png_is_skipped_and_counted(tmp_path, tokenizer, num_workers):
    rng = np.random.default_rng(random_seed())
    bad = int(rng.integers(20))
    index = write_image_folder(tmp_path, 20, rng, truncated={bad})
    config = csv_config(index, max_skipped_fraction=0.1, num_workers=num_workers)
    batches = take(pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=4,
                                          seed=3), 15)  # 60 examples: three epochs
    # 60 kept examples need 63 reads: three whole epochs hold the bad file thrice, and the
    # three reads into the fourth epoch may hit it once more.
    assert sum(batch["skipped"] for batch in batches) in (3, 4)
    assert all(batch["image"].shape == (4, 16, 16, 3) for batch in batches)


def test_too_many_bad_files_stop_with_one_line_naming_the_file(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    bad = {int(i) for i in rng.choice(20, size=3, replace=False)}
    index = write_image_folder(tmp_path, 20, rng, truncated=bad)
    os.remove(tmp_path / "images" / f"{min(bad):04d}.png")  # one of them missing altogether
    config = csv_config(index, max_skipped_fraction=0.05)  # judged after 200 examples
    with pytest.raises(UserError) as error:
        take(pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=4, seed=0), 60)
    message = str(error.value)
    assert "\n" not in message and "more than data.max_skipped_fraction=0.05" in message
    named = [i for i in bad if f"images/{i:04d}.png" in message]
    assert len(named) == 1
    reason = "missing file" if named[0] == min(bad) else "unreadable image"
    assert reason in message


def test_skip_counter_allows_the_fraction_and_judges_only_after_enough_examples():
    good, bad = {"origin": "ok"}, {"origin": "x.png", "error": "missing file"}
    fraction = float(np.random.choice([0.05, 0.1, 0.2]))
    window = round(skipping.JUDGE_AFTER / fraction)
    counter = skipping.SkipCounter(fraction)
    for _ in range(skipping.JUDGE_AFTER * 3):  # far above the fraction, but too few read
        assert counter.is_bad(bad)
    while counter.seen < window - 1:
        assert not counter.is_bad(good)
    # At `window` examples read, 3 * JUDGE_AFTER bad ones is more than the fraction allows.
    with pytest.raises(UserError, match=f"{3 * skipping.JUDGE_AFTER + 1} of {window} examples "
                                        f"read were unreadable.*x.png"):
        counter.is_bad(bad)
    allowed = skipping.SkipCounter(fraction)
    period = round(1 / fraction)
    for i in range(10 * window):  # the last of every `period` examples: exactly the fraction
        is_bad = i % period == period - 1
        assert allowed.is_bad(bad if is_bad else good) == is_bad
    with pytest.raises(UserError, match="x.png"):
        skipping.SkipCounter(0.0).is_bad(bad)
    with pytest.raises(UserError, match=r"must be in \[0, 1\]"):
        skipping.SkipCounter(1.5)


def test_skip_counts_survive_a_resume(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path, 16, rng, truncated={int(rng.integers(16))})
    config = csv_config(index, max_skipped_fraction=0.1)
    make = lambda: iter(pipeline.train_dataset(  # noqa: E731
        config, tokenizer, max_len=12, global_batch_size=4, seed=1))
    first = make()
    for _ in range(int(rng.integers(3, 9))):
        next(first)
    state = first.get_state()
    resumed = make()
    resumed.set_state(state)
    for _ in range(5):
        a, b = next(first), next(resumed)
        assert a["skipped"] == b["skipped"]
        np.testing.assert_array_equal(a["image"], b["image"])
    assert str(first.get_state()) == str(resumed.get_state())  # counters included


@pytest.fixture
def mock_cifar():
    with tfds.testing.mock_data(num_examples=40):
        yield


def test_tfds_label_datasets_train_on_prompt_captions(mock_cifar):
    source = TfdsSource("cifar10", "train", text_key="label", label_key="label",
                        prompts=("a photo of a {}.", "art of a {}."))
    assert len(source) == 40
    i = int(np.random.randint(40))
    example = source[i]
    name = source.class_names[example["label"]]
    assert example["caption"] == [f"a photo of a {name}.", f"art of a {name}."]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["origin"] == f"tfds:cifar10[train]#{i}"


def test_tfds_errors_name_the_feature_or_dataset(mock_cifar):
    with pytest.raises(UserError, match="no feature 'caption' for the texts.*data.text_key.*'label'"):
        TfdsSource("cifar10", "train")
    with pytest.raises(UserError, match="tfds has no dataset 'no_such_data'"):
        TfdsSource("no_such_data", "train")


def test_tfds_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(UserError, match=r"cannot open tfds dataset 'cifar10'.*tfds build cifar10"):
        TfdsSource("cifar10", "train", data_dir=str(tmp_path), text_key="label")


def test_tfds_eval_has_pairs_and_zeroshot_classes(mock_cifar, tokenizer):
    config = pipeline.default_config()
    config.update(name="tfds:cifar10", text_key="label", zeroshot_name="tfds:cifar10",
                  image_size=16, num_eval=24)
    data = held_out.eval_data(config, tokenizer, max_len=12)
    assert data["pairs"]["inputs"]["image"].shape == (24, 16, 16, 3)
    classes = data["classes"]
    source = TfdsSource("cifar10", "test", label_key="label", text_key="")
    assert classes["class_names"] == source.class_names
    i = int(np.random.randint(24))
    assert classes["labels"][i] == source[i]["label"]
    np.testing.assert_array_equal(
        classes["inputs"]["image"][i],
        images.eval_view(source[i]["image"], 16),
    )
    prompts = sources.DEFAULT_PROMPTS
    assert classes["class_texts"].shape == (10, len(prompts), 12)


def test_zeroshot_needs_a_labelled_source(tmp_path, tokenizer):
    index = write_image_folder(tmp_path, 4, np.random.default_rng(random_seed()))
    with pytest.raises(UserError, match="zero-shot needs class labels"):
        held_out.eval_data(csv_config(index, zeroshot_name=f"csv:{index}"), tokenizer, max_len=8)


def test_array_record_shards_give_the_csv_pairs(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path, 10, rng)
    tally = array_record.Tally()
    array_record.write_shards(
        array_record.examples_from_csv(CsvSource(index), tally), str(tmp_path / "shard"), 3
    )
    config = csv_config(index, eval_name=f"array_record:{tmp_path}/shard-*", num_eval=10)
    from_shards = held_out.eval_data(config, tokenizer, max_len=12)["pairs"]["inputs"]
    from_csv = held_out.eval_data(csv_config(index, num_eval=10), tokenizer, max_len=12)["pairs"]["inputs"]
    # Shards interleave rows (j % 3); as sets of (image, text) the two sources agree.
    as_set = lambda inputs: sorted(  # noqa: E731
        (t.tobytes(), i.tobytes()) for t, i in zip(inputs["text"], inputs["image"]))
    assert as_set(from_shards) == as_set(from_csv)


@pytest.fixture
def inmemory_kind():
    """Registers "inmemory:N" (N random pairs) from the test alone, and unregisters it after."""
    rng = np.random.default_rng(random_seed())
    pixels = rng.integers(0, 256, (64, 20, 20, 3), dtype=np.uint8)

    def open_inmemory(data_config, argument, split, role, with_audio):
        return [{"image": pixels[i], "caption": f"{split} pair {i}", "origin": f"inmemory#{i}"}
                for i in range(int(argument))]

    sources.SOURCES.register("inmemory", sources.SourceKind(open_inmemory, argument_name="N"))
    try:
        yield pixels
    finally:
        del sources.SOURCES._entries["inmemory"]


def test_a_registered_source_kind_is_a_valid_spec_everywhere(inmemory_kind, tokenizer):
    config = pipeline.default_config()
    config.update(eval_name="inmemory:6", image_size=16, num_eval=6)
    pipeline.validate(config)
    assert sources.parse("inmemory:6") == ("inmemory", "6")
    with pytest.raises(UserError, match=r"unknown data source 'inmemory'; use 'shapes', .*"
                                        r"'array_record:GLOB' or 'inmemory:N'"):
        sources.parse("inmemory")
    assert sources.modalities(config, "inmemory:6") == ("image", "text")
    source = sources.open_source(config, "inmemory:6", "validation")
    assert [e["caption"] for e in source] == [f"validation pair {i}" for i in range(6)]
    with pytest.raises(UserError, match="'inmemory:6': zero-shot needs class labels; use "
                                        "'shapes' or 'tfds:NAME'"):
        sources.open_zeroshot(config, "inmemory:6")
    inputs = held_out.eval_data(config, tokenizer, max_len=12)["pairs"]["inputs"]
    i = int(np.random.randint(6))
    np.testing.assert_array_equal(inputs["image"][i], images.eval_view(inmemory_kind[i], 16))
    np.testing.assert_array_equal(inputs["text"][i],
                                  tokenizer.encode([f"{config.eval_split} pair {i}"], 12)[0])
