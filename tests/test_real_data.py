"""Training from real-data sources end to end, and resuming the stream in a fresh process."""

import json
import runpy
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigalign import config as config_lib, evaluate, train
from bigalign.data import pipeline, synthetic, tokenizer
from bigalign.errors import UserError
from helpers import random_seed, recomputed, write_image_folder, write_sound_folder

REPO = __file__.rsplit("/tests/", 1)[0]


def train_briefly(config, workdir, seed) -> dict:
    """Trains 4 steps; checks the log, and the final metrics against a numpy recomputation."""
    config.total_steps, config.log_every, config.checkpoint_every = 4, 2, 4
    config.data.num_eval, config.seed = 16, seed
    results = train.train_and_evaluate(config, str(workdir))
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [record["train/loss"] for record in logged if "train/loss" in record]
    assert len(losses) == 2 and all(np.isfinite(losses)), f"seed {seed}"
    assert all(record["data/skipped"] == 0 for record in logged if "train/loss" in record)
    assert results == recomputed(workdir), f"seed {seed}"
    return results


def test_trains_from_a_csv_folder_and_evaluates_retrieval(tiny_config, tmp_path):
    seed = random_seed()
    index = write_image_folder(tmp_path / "data", 40, np.random.default_rng(seed))
    tiny_config.data.update(name=f"csv:{index}", eval_name=f"csv:{index}")
    results = train_briefly(tiny_config, tmp_path / "run", seed)
    assert {"eval/retrieval/image2text_recall@1", "eval/retrieval/text2image_recall@5"} <= results.keys()
    assert not any("zeroshot" in key for key in results)


def test_trains_audio_text_pairs_from_a_csv_of_wav_files(tiny_config, tmp_path):
    seed = random_seed()
    index = write_sound_folder(tmp_path / "data", 32, np.random.default_rng(seed))
    del tiny_config.model.image
    tiny_config.model.audio = config_lib.tower_config(
        "audio", width=32, depth=1, num_heads=2, mlp_dim=64
    )
    tiny_config.loss.pairs = (("audio", "text"),)
    tiny_config.data.update(name=f"csv:{index}", eval_name=f"csv:{index}",
                            csv_image_column="", csv_audio_column="sound")
    results = train_briefly(tiny_config, tmp_path / "run", seed)
    assert {"eval/retrieval/audio2text_recall@1", "eval/retrieval/text2audio_recall@5"} <= results.keys()


def test_trains_from_array_record_shards_made_by_the_tool(tiny_config, tmp_path):
    seed = random_seed()
    index = write_image_folder(tmp_path / "data", 40, np.random.default_rng(seed))
    make_array_record = runpy.run_path(f"{REPO}/tools/make_array_record.py")["main"]
    assert make_array_record(["--csv", index, "--output", str(tmp_path / "shards" / "train"),
                              "--num_shards", "2"]) == 0
    tiny_config.data.update(name=f"array_record:{tmp_path}/shards/train-*",
                            eval_name=f"csv:{index}")
    results = train_briefly(tiny_config, tmp_path / "run", seed)
    assert "eval/retrieval/image2text_recall@1" in results


def test_trains_from_tfds_and_evaluates_zeroshot(tiny_config, tmp_path):
    import tensorflow_datasets as tfds

    tiny_config.data.update(name="tfds:cifar10", text_key="label", zeroshot_name="tfds:cifar10")
    with tfds.testing.mock_data(num_examples=48):
        results = train_briefly(tiny_config, tmp_path / "run", random_seed())
    assert {"eval/zeroshot/image_top1", "eval/retrieval/image2text_recall@1"} <= results.keys()


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}


def write_labelled_csvs(folder, rng) -> dict:
    """Pictures of four colours: a captioned training CSV, labelled probe-training and test
    CSVs (filepath,label: names and ids) and the class-names file."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    names = list(COLOURS)
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    rows = {"train": ["filepath,caption"], "probe": ["filepath,label"], "test": ["filepath,label"]}
    for i in range(96):
        label = int(rng.integers(len(names)))
        noise = rng.integers(-25, 26, size=(20, 20, 3))
        pixels = np.clip(np.array(COLOURS[names[label]]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        part = "train" if i < 48 else "probe" if i < 80 else "test"
        cell = f"a photo of a {names[label]} square" if part == "train" else (
            names[label] if i % 2 else str(label))  # class names and ids both
        rows[part].append(f"images/{i}.png,{cell}")
    for part, lines in rows.items():
        (folder / f"{part}.csv").write_text("\n".join(lines) + "\n")
    return {part: str(folder / f"{part}.csv") for part in rows} | {"classes": str(folder / "classes.txt")}


def test_a_labelled_csv_dataset_trains_through_the_cli_and_runs_every_evaluator(tmp_path):
    paths = write_labelled_csvs(tmp_path / "data", np.random.default_rng(random_seed()))
    workdir = tmp_path / "run"
    flags = {"total_steps": 6, "batch_size": 16, "log_every": 3, "checkpoint_every": 6,
             "optimizer.warmup_steps": 1, "data.image_size": 16, "data.name": f"csv:{paths['train']}",
             "data.eval_name": f"csv:{paths['train']}", "data.zeroshot_name": f"csv:{paths['test']}",
             "data.class_names": paths["classes"], "data.prompts": "('a photo of a {} square',)",
             "evals.linear_probe.train_data": f"csv:{paths['probe']}",
             "evals.linear_probe.shots": "(2,)", "evals.zeroshot.every": 3}
    out = subprocess.run(
        [sys.executable, "-m", "bigalign.train", "--config", f"{REPO}/configs/demo.py",
         "--workdir", str(workdir), *[f"--config.{k}={v}" for k, v in flags.items()]],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval/zeroshot/image_top1" in r] == [3, 6]
    final = records[-1]
    for name in ("zeroshot/image_top1", "zeroshot/image_top5", "retrieval/image2text_recall@1",
                 "retrieval/text2image_recall@10", "linear_probe/image_2shot_top1",
                 "linear_probe/image_full_top1", "geometry/image_text_gap",
                 "geometry/image_effective_rank", "geometry/logit_scale"):
        assert f"eval/{name}" in final, (name, sorted(final))
    assert final["eval/zeroshot/image_top5"] == 1.0  # four classes: all are in the top 5
    # Solid colours are linearly separable even in a barely trained model's embeddings;
    # wrong labels (ids and names mixed up, rows shifted) would not be.
    assert final["eval/linear_probe/image_full_top1"] >= 0.75, final
    assert "4 classes (chance 0.2500)" in out.stdout and "(test): 16 examples" in out.stdout
    # Probing with a training set of other classes is a one-line error.
    config = config_lib.load_saved(str(workdir))
    config.evals.linear_probe.train_data = "shapes"
    with pytest.raises(UserError, match=r"linear_probe: the training set 'shapes' has other class "
                                        r"names than the test set 'csv:.*test.csv'"):
        evaluate.evaluate_run(str(workdir), config=config)


def take_batches(config: dict, count: int, tokenizer_path: str, restore="", save="", save_after=0) -> dict:
    """`count` batches of a CSV training stream ({"i/key": array}), restoring the grain
    iterator state from `restore` first and saving it to `save` after `save_after` batches,
    where given."""
    data_config = pipeline.default_config()
    data_config.update(config)
    tok = tokenizer.Tokenizer.load(tokenizer_path)
    iterator = iter(pipeline.train_dataset(data_config, tok, max_len=8, global_batch_size=4, seed=5))
    checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    if restore:
        checkpointer.restore(restore, args=grain.checkpoint.CheckpointRestore(iterator))
    batches = [next(iterator) for _ in range(save_after)]
    if save:
        checkpointer.save(save, args=grain.checkpoint.CheckpointSave(iterator))
    batches += [next(iterator) for _ in range(count - save_after)]
    iterator.close()
    return {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}


# take_batches in a fresh process: argv = config JSON, count, tokenizer, restore, output .npz.
IN_A_FRESH_PROCESS = f"""
import json, sys
import numpy as np
sys.path.insert(0, {REPO + "/tests"!r})
from test_real_data import take_batches
np.savez(sys.argv[5], **take_batches(json.loads(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]))
"""


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_fresh_process_continues_the_exact_stream(tmp_path, num_workers):
    """The stream here, saving its state midway; the rest in a new process from that state."""
    seed = random_seed()
    rng = np.random.default_rng(seed)
    index = write_image_folder(tmp_path / "data", 24, rng, truncated={int(rng.integers(24))})
    config = {"name": f"csv:{index}", "image_size": 16, "num_workers": num_workers,
              "max_skipped_fraction": 0.1}
    tok = str(tmp_path / "tok.model")
    tokenizer.train_tokenizer(synthetic.caption_corpus(), tok, 64)
    head, tail = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    whole = take_batches(config, head + tail, tok, save=str(tmp_path / "state"), save_after=head)
    args = [json.dumps(config), str(tail), tok, str(tmp_path / "state"), str(tmp_path / "rest.npz")]
    result = subprocess.run([sys.executable, "-c", IN_A_FRESH_PROCESS, *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rest = dict(np.load(tmp_path / "rest.npz"))
    shifted = {f"{int(k.split('/')[0]) + head}/{k.split('/')[1]}": v for k, v in rest.items()}
    assert shifted.keys() == {k for k in whole if int(k.split("/")[0]) >= head}, f"seed {seed}"
    for key in shifted:
        np.testing.assert_array_equal(whole[key], shifted[key], err_msg=f"{key}, seed {seed}")
