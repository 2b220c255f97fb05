"""Tests for real-data sources (CSV, tfds, ArrayRecord) through the pipeline, and skipping bad files."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigalign import modalities as modalities_lib
from bigalign.modalities import audio as audio_modality
from bigalign.data import (array_record, held_out, images, pipeline, skipping, sources,
                           synthetic, waveforms)
from bigalign.data.csv_source import CsvSource
from bigalign.data.tfds_source import TfdsSource
from bigalign.errors import UserError
from helpers import PreparedInputs, held_out_run, random_seed, write_image_folder, write_sound_folder


def csv_config(index: str, **overrides):
    config = pipeline.default_config()
    config.update(name=f"csv:{index}", eval_name=f"csv:{index}", image_size=16, num_eval=12)
    config.update(overrides)
    return config


def held_out_inputs(data_config, tokenizer, spec: str, split: str, *, modalities=("image", "text"),
                    role: str = "pairs") -> tuple[held_out.EmbeddedSet, dict]:
    """The held-out set `spec` embedded with `PreparedInputs`, and its prepared inputs
    {modality: [N, ...]} (text: the caption tokens)."""
    embedded = held_out.embed_set(held_out_run(data_config, tokenizer, max_len=12, batch_size=5),
                                  PreparedInputs(), spec,
                                  split, modalities=modalities, role=role)
    inputs = {m: values.reshape(len(values), *modalities_lib.get(m).input_shape(data_config, 12))
              for m, values in embedded.embeddings.items()}
    if "text" in inputs:
        np.testing.assert_array_equal(inputs["text"], embedded.caption_tokens)
    return embedded, inputs


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
    config = csv_config(index)
    assert held_out.pairs_spec(config) == f"csv:{index}"
    assert held_out.classes_spec(config) == ""  # no data.zeroshot_name: no zero-shot
    pairs, inputs = held_out_inputs(config, tokenizer, config.eval_name, config.eval_split)
    assert pairs.count == 12  # num_eval caps the 20 rows
    assert inputs["image"].shape == (12, 16, 16, 3)
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
    pairs, inputs = held_out_inputs(config, tokenizer, config.eval_name, config.eval_split,
                                    modalities=("audio", "text"))
    assert pairs.count == 10 and inputs["audio"].shape[1:] == pipeline.input_shapes(
        config, max_len=12)["audio"]
    rows = CsvSource(index, image_column="", audio_column="sound")
    for i in range(10):  # each row's first window (a random one would differ in a longer sound)
        waveform = waveforms.load(rows[i]["audio"], config.audio.sample_rate)
        window = waveforms.clip(waveform, clip_samples)
        expected = audio_modality.normalise(window[None], options)[0]
        np.testing.assert_allclose(inputs["audio"][i], expected, atol=1e-5)
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
    assert held_out.pairs_spec(config) == held_out.classes_spec(config) == "tfds:cifar10"
    pairs, pair_inputs = held_out_inputs(config, tokenizer, "tfds:cifar10", config.eval_split)
    assert pairs.count == 24 and pair_inputs["image"].shape == (24, 16, 16, 3)
    classes, inputs = held_out_inputs(config, tokenizer, "tfds:cifar10", config.zeroshot_split,
                                      modalities=("image",), role="classes")
    source = TfdsSource("cifar10", "test", label_key="label", text_key="")
    assert classes.class_names == source.class_names
    np.testing.assert_array_equal(classes.labels, [source[j]["label"] for j in range(24)])
    i = int(np.random.randint(24))
    np.testing.assert_array_equal(inputs["image"][i], images.eval_view(source[i]["image"], 16))
    prompts = held_out.class_texts(config, classes.spec, classes.class_names)
    assert len(prompts) == 10
    name = source.class_names[i % 10]
    assert prompts[i % 10] == [template.format(name) for template in sources.DEFAULT_PROMPTS]


def write_class_names(folder, rng: np.random.Generator, count: int) -> tuple[str, list[str]]:
    """A data.class_names file of `count` shapes class names in random order: (path, names)."""
    names = [str(name) for name in rng.permutation(synthetic.CLASS_NAMES)[:count]]
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    return str(folder / "classes.txt"), names


def test_csv_zeroshot_reads_labels_by_name_or_id(tmp_path):
    rng = np.random.default_rng(random_seed())
    class_file, names = write_class_names(tmp_path, rng, int(rng.integers(2, 6)))
    labels = rng.integers(len(names), size=10)
    by_name = rng.permutation(10) < 5  # half the cells name the class, half give its id
    cells = [names[label] if name else str(label) for label, name in zip(labels, by_name)]
    index = write_image_folder(tmp_path, 10, rng)
    header, *rows = open(index).read().splitlines()
    with open(index, "w") as f:
        f.write("\n".join([f"{header},label", *(f"{r},{c}" for r, c in zip(rows, cells))]) + "\n")
    config = csv_config(index, zeroshot_name=f"csv:{index}", class_names=class_file)
    source = sources.open_zeroshot(config, config.zeroshot_name)
    assert sources.class_names(source) == names
    # The held-out classes are the eval views of these examples.
    examples = [pipeline.EvalView(config).map(source[i]) for i in range(len(source))]
    assert [example["label"] for example in examples] == labels.tolist()
    i = int(rng.integers(10))
    assert examples[i].keys() == {"image", "label", "origin"}
    np.testing.assert_array_equal(examples[i]["image"],
                                  images.eval_view(CsvSource(index)[i]["image"], 16))
    prompt = sources.DEFAULT_PROMPTS[0].format(names[int(rng.integers(len(names)))])
    assert prompt in pipeline.tokenizer_corpus(config)


def test_a_zeroshot_csv_needs_no_caption_column(tmp_path):
    rng = np.random.default_rng(random_seed())
    class_file, names = write_class_names(tmp_path, rng, 3)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "index.tsv").write_text(f"path\tclass\na.png\t{names[2]}\n")
    config = pipeline.default_config()
    config.update(csv_image_column="path", csv_label_column="class", class_names=class_file)
    spec = f"csv:{tmp_path / 'index.tsv'}"
    source = sources.open_zeroshot(config, spec)
    assert source[0] == {"image": str(tmp_path / "a.png"), "label": 2,
                         "origin": str(tmp_path / "a.png")}
    assert sources.class_names(source) == names
    with pytest.raises(UserError, match="has no column 'caption'"):  # pairs still need captions
        sources.open_source(config, spec, "test")


@pytest.mark.parametrize("cell, with_names, match", [
    ("zebra", True, "label 'zebra' is neither one of the 3 class names of data.class_names nor a "
                    "class id; fix the cell or add the class to that file"),
    ("3", True, r"class id 3 is out of range for the 3 class names of data.class_names "
                r"\(ids 0..2\); fix the cell"),
    ("-1", True, "label '-1' is neither one of the 3 class names"),
    (" ", True, "has an empty 'label' cell; give each row a class name of data.class_names or a "
                "class id 0..2"),
    ("1", False, r"zero-shot on CSV index '.*index.csv' needs class names for its prompts; list "
                 r"them in a data.class_names file"),
])
def test_bad_csv_labels_stop_at_open_naming_the_line(tmp_path, cell, with_names, match):
    rng = np.random.default_rng(random_seed())
    class_file, _ = write_class_names(tmp_path, rng, 3)
    bad = int(rng.integers(1, 6))
    # Row 0's caption spans two lines, so row r ends on line r + 3 of the file.
    rows = ['a.png,"two\nlines",0', *(f"a.png,x,{cell if r == bad else 1}" for r in range(1, 6))]
    (tmp_path / "index.csv").write_text("\n".join(["filepath,caption,label", *rows]) + "\n")
    config = pipeline.default_config()
    config.class_names = class_file if with_names else ""
    where = rf"CSV index '.*index.csv' line {bad + 3}\W+" if with_names else ""
    with pytest.raises(UserError, match=where + match):
        sources.open_zeroshot(config, f"csv:{tmp_path / 'index.csv'}")


def test_a_zeroshot_csv_needs_its_label_column(tmp_path):
    class_file, _ = write_class_names(tmp_path, np.random.default_rng(random_seed()), 3)
    (tmp_path / "index.csv").write_text("filepath,caption\na.png,x\n")
    config = pipeline.default_config()
    config.class_names = class_file
    with pytest.raises(UserError, match=r"no column 'label' \(found \['filepath', 'caption'\].*"
                                        r"csv_label_column"):
        sources.open_zeroshot(config, f"csv:{tmp_path / 'index.csv'}")


def test_array_record_shards_give_the_csv_pairs(tmp_path, tokenizer):
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path, 10, rng)
    tally = array_record.Tally()
    array_record.write_shards(
        array_record.examples_from_csv(CsvSource(index), tally), str(tmp_path / "shard"), 3
    )
    config = csv_config(index, eval_name=f"array_record:{tmp_path}/shard-*", num_eval=10)
    from_shards = held_out_inputs(config, tokenizer, config.eval_name, config.eval_split)[1]
    csv = csv_config(index, num_eval=10)
    from_csv = held_out_inputs(csv, tokenizer, csv.eval_name, csv.eval_split)[1]
    assert len(from_shards["image"]) == len(from_csv["image"]) == 10
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
                                        "'shapes', 'tfds:NAME' or 'csv:PATH'"):
        sources.open_zeroshot(config, "inmemory:6")
    assert held_out.pairs_spec(config) == "inmemory:6"
    pairs, inputs = held_out_inputs(config, tokenizer, "inmemory:6", config.eval_split)
    assert pairs.count == 6
    i = int(np.random.randint(6))
    np.testing.assert_array_equal(inputs["image"][i], images.eval_view(inmemory_kind[i], 16))
    np.testing.assert_array_equal(inputs["text"][i],
                                  tokenizer.encode([f"{config.eval_split} pair {i}"], 12)[0])
