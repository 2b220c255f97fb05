"""Tests for bigalign.data.pipeline on the shapes data: batches, augmentation, sharding, resume, eval."""


import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigalign.modalities import audio as audio_modality
from bigalign.data import held_out, pipeline, synthetic
from bigalign.errors import UserError
from helpers import PreparedInputs, held_out_run, random_seed, write_image_folder


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
        assert batch.keys() == {"image", "text", "skipped"}
        assert batch["skipped"] == 0
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["text"].shape == (8, 12) and batch["text"].dtype == np.int32
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
            assert batch.keys() == {*modalities, "skipped"}
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
    assert next(iter(dataset)).keys() == {"image", "text", "skipped"}
    run = held_out_run(config, tokenizer, max_len=12, batch_size=250)
    pairs = held_out.embed_set(run, PreparedInputs(), "shapes", config.eval_split,
                               modalities=("image", "text"))
    assert pairs.embeddings.keys() == {"image", "text"}
    classes = held_out.embed_set(run, PreparedInputs(), "shapes", config.zeroshot_split,
                                 modalities=("image",), role="classes")
    assert classes.embeddings.keys() == {"image"}


def test_unknown_modality_is_a_one_line_error(tokenizer):
    config = small_config()
    for modalities, problem in ((("image", "video"), r"unknown modalities \['video'\]"),
                                ((), "no modalities")):
        expected = f"{problem} for data.name='shapes'; valid: image, text, audio"
        with pytest.raises(UserError, match=expected):
            pipeline.train_dataset(config, tokenizer, max_len=8, global_batch_size=8, seed=0,
                                   modalities=modalities)
    # The evaluators embed a held-out set with the towers its source provides; asked for
    # others, embed_set stops with the same line.
    for modalities, problem in ((("image", "video"), r"unknown modalities \['video'\]"),
                                ((), "no modalities")):
        expected = f"{problem} for the held-out set pairs='shapes'; valid: image, text, audio"
        with pytest.raises(UserError, match=expected):
            held_out.embed_set(held_out_run(config, tokenizer, max_len=8, batch_size=250), PreparedInputs(), "shapes",
                               config.eval_split, modalities=modalities)


def test_audio_augmentation_is_a_small_gain(tokenizer):
    make = lambda augment: next(iter(pipeline.train_dataset(  # noqa: E731
        small_config(augment=augment, seed=seed), tokenizer, max_len=8, global_batch_size=8,
        seed=2, modalities=("audio",),
    )))["audio"]
    seed = random_seed()
    plain, augmented = make(False), make(True)
    # A gain g adds 2 ln(g) / AUDIO_LOG_MEL_STD wherever the energy is far above the floor.
    loud = plain * audio_modality.LOG_MEL_STD + audio_modality.LOG_MEL_MEAN > -8  # tone bins
    shifts = [(a - p)[mask] for a, p, mask in zip(augmented, plain, loud)]
    limit = 2 * np.log(10 ** (pipeline.AUDIO_GAIN_DB / 20)) / audio_modality.LOG_MEL_STD
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
    all_images = np.stack([source[i]["image"] for i in range(32)])
    keys = lambda images: sorted(x.tobytes() for x in images)  # noqa: E731
    assert keys(epochs[0]) == keys(epochs[1]) == keys(all_images)
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("source", ["shapes", "csv"])
def test_each_process_loads_its_block_of_the_global_batch_augmented_alike(
        source, tokenizer, tmp_path):
    """Process p of P gets rows p*b ... (p+1)*b - 1 of the one-process batch (b = B / P),
    each with the same crop, flip, jitter and caption: randomness keys on the global
    example index, so the global batch is the same for any number of processes. A stream
    started at batch k (resuming on another number of processes) continues the same order."""
    rng = np.random.default_rng(random_seed())
    config = small_config(augment=True)
    if source == "csv":
        config.update(name=f"csv:{write_image_folder(tmp_path, 40, rng)}",
                      crop_scale=(0.3, 1.0), flip=True)
    make = lambda process, start=0: iter(pipeline.train_dataset(  # noqa: E731
        config, tokenizer, max_len=12, global_batch_size=12, seed=5, process=process,
        start_batch=start))
    whole = take(make(None), 4)  # this one process loads all 12
    for count in (2, 3, 4):
        share = 12 // count
        for index in range(count):
            start = int(rng.integers(2))
            loaded = take(make((index, count), start), 4 - start)
            for step, (got, expected) in enumerate(zip(loaded, whole[start:]), start=start):
                for key in ("image", "text"):
                    np.testing.assert_array_equal(
                        got[key], expected[key][index * share:(index + 1) * share],
                        err_msg=f"{key}, process {index} of {count}, step {step}, seed {config.seed}")
    with pytest.raises(UserError, match="batch_size=12 must be a positive multiple of the 5"):
        pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=12, seed=5,
                               process=(0, 5))


def test_processes_augment_their_examples_independently(tokenizer, tmp_path):
    """One picture repeated: the j-th example of every process must not get the same crop
    and flip (as it did when each process seeded its examples by their local index). Rows
    at the same place in two processes' batches are as often identical as any two rows."""
    rng = np.random.default_rng(random_seed())
    index = write_image_folder(tmp_path, 1, rng)
    lines = (tmp_path / "index.csv").read_text().splitlines()
    (tmp_path / "index.csv").write_text("\n".join([lines[0]] + [lines[1]] * 64) + "\n")
    config = small_config(name=f"csv:{index}", augment=True, crop_scale=(0.3, 1.0), flip=True)
    seed = int(rng.integers(2**31))
    streams = [iter(pipeline.train_dataset(config, tokenizer, max_len=12, global_batch_size=32,
                                           seed=seed, process=(p, 2))) for p in range(2)]
    same_place = any_rows = pairs = 0
    for _ in range(4):
        first, second = (next(stream)["image"].reshape(16, -1) for stream in streams)
        equal = (first[:, None] == second[None]).all(-1)  # [16, 16]: row i of 0 vs row j of 1
        same_place += int(np.trace(equal))
        any_rows += int(equal.sum() - np.trace(equal))
        pairs += 16
    chance = any_rows / (15 * pairs)  # the rate at which two unrelated rows are identical
    print(f"identical at the same place: {same_place}/{pairs}, elsewhere {chance:.4f}, seed {seed}")
    assert same_place <= max(3, 5 * chance * pairs)


def test_unknown_dataset_name_lists_valid_ones(tokenizer):
    with pytest.raises(UserError, match="unknown data source 'coco'.*'shapes', 'tfds:NAME'"):
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
def test_held_out_sets_match_the_held_out_split(tokenizer, modalities):
    config = small_config()
    n, classes = config.num_eval, synthetic.NUM_CLASSES
    assert held_out.pairs_spec(config) == held_out.classes_spec(config) == "shapes"
    run = held_out_run(config, tokenizer, max_len=16, batch_size=20)  # the last batch partial
    prepared = PreparedInputs()
    pairs = held_out.embed_set(run, prepared, "shapes", config.eval_split, modalities=modalities)
    assert pairs.spec == "shapes" and pairs.count == n
    assert pairs.embeddings.keys() == set(modalities)
    shapes = pipeline.input_shapes(config, max_len=16)
    inputs = {}
    for modality in modalities:
        expected = {"image": np.uint8, "text": np.int32, "audio": np.float32}[modality]
        assert prepared.calls[modality] == [(b, expected, shapes[modality]) for b in (20, 20, 8)]
        inputs[modality] = pairs.embeddings[modality].reshape(n, *shapes[modality])
    np.testing.assert_array_equal(pairs.caption_owner, np.arange(n))  # one caption each
    assert pairs.caption_tokens.shape == (n, 16) and pairs.caption_tokens.dtype == np.int32
    np.testing.assert_array_equal(inputs["text"], pairs.caption_tokens)
    assert pairs.labels is None and pairs.class_names is None

    classified = tuple(m for m in modalities if m != "text")
    zeroshot = held_out.embed_set(run, PreparedInputs(), "shapes", config.zeroshot_split,
                                  modalities=classified, role="classes")
    assert zeroshot.count == n and zeroshot.embeddings.keys() == set(classified)
    for modality, values in zeroshot.embeddings.items():  # the same held-out examples
        np.testing.assert_array_equal(values, pairs.embeddings[modality])
    assert zeroshot.labels.shape == (n,) and zeroshot.caption_tokens is None
    assert zeroshot.class_names == synthetic.CLASS_NAMES

    audio_config = config.audio
    source = synthetic.ShapesSource(
        "eval", n, config.image_size, config.seed, with_audio=True,
        sample_rate=audio_config.sample_rate,
        clip_samples=round(audio_config.clip_seconds * audio_config.sample_rate),
    )
    i = int(np.random.randint(n))
    example = source[i]
    np.testing.assert_array_equal(zeroshot.labels, [source[j]["label"] for j in range(n)])
    assert tokenizer.decode(pairs.caption_tokens[i : i + 1]) == [example["caption"]]
    if "image" in modalities:
        np.testing.assert_array_equal(inputs["image"][i], example["image"])
    if "audio" in modalities:
        expected = audio_modality.normalise(
            example["audio"][None], audio_modality.spectrogram_options(config)
        )[0]
        np.testing.assert_allclose(inputs["audio"][i], expected, atol=1e-5)
    prompts = held_out.class_texts(config, "shapes", zeroshot.class_names)
    assert len(prompts) == classes
    label = int(np.random.randint(classes))
    assert prompts[label] == synthetic.class_prompts(label)


def test_tokenizer_corpus_holds_every_caption():
    corpus = set(pipeline.tokenizer_corpus(small_config()))
    source = synthetic.ShapesSource("train", 1000, 8, random_seed())
    assert all(source[i]["caption"] in corpus for i in np.random.randint(0, 1000, size=50))
