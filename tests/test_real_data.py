"""Training from real-data sources end to end, and resuming the stream in a fresh process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigalign import config as config_lib, train
from helpers import write_image_folder, write_sound_folder

REPO = __file__.rsplit("/tests/", 1)[0]


def train_briefly(config, workdir) -> dict:
    config.total_steps, config.log_every, config.checkpoint_every = 4, 2, 4
    config.data.num_eval = 16
    results = train.train_and_evaluate(config, str(workdir))
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [record["train/loss"] for record in logged if "train/loss" in record]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(record["data/skipped"] == 0 for record in logged if "train/loss" in record)
    return results


def test_trains_from_a_csv_folder_and_evaluates_retrieval(tiny_config, tmp_path):
    index = write_image_folder(tmp_path / "data", 40, np.random.default_rng())
    tiny_config.data.update(name=f"csv:{index}", eval_name=f"csv:{index}")
    results = train_briefly(tiny_config, tmp_path / "run")
    assert {"eval/image2text_recall@1", "eval/text2image_recall@5"} <= results.keys()
    assert not any("zeroshot" in key for key in results)


def test_trains_audio_text_pairs_from_a_csv_of_wav_files(tiny_config, tmp_path):
    index = write_sound_folder(tmp_path / "data", 32, np.random.default_rng())
    del tiny_config.model.image
    tiny_config.model.audio = config_lib.tower_config(
        "audio", width=32, depth=1, num_heads=2, mlp_dim=64
    )
    tiny_config.loss.pairs = (("audio", "text"),)
    tiny_config.data.update(name=f"csv:{index}", eval_name=f"csv:{index}",
                            csv_image_column="", csv_audio_column="sound")
    results = train_briefly(tiny_config, tmp_path / "run")
    assert {"eval/audio2text_recall@1", "eval/text2audio_recall@5"} <= results.keys()


def test_trains_from_array_record_shards_made_by_the_tool(tiny_config, tmp_path):
    index = write_image_folder(tmp_path / "data", 40, np.random.default_rng())
    subprocess.run(
        [sys.executable, f"{REPO}/tools/make_array_record.py", "--csv", index,
         "--output", str(tmp_path / "shards" / "train"), "--num_shards", "2"],
        check=True, capture_output=True,
    )
    tiny_config.data.update(name=f"array_record:{tmp_path}/shards/train-*",
                            eval_name=f"csv:{index}")
    results = train_briefly(tiny_config, tmp_path / "run")
    assert "eval/image2text_recall@1" in results


def test_trains_from_tfds_and_evaluates_zeroshot(tiny_config, tmp_path):
    tiny_config.data.update(name="tfds:cifar10", text_key="label", zeroshot_name="tfds:cifar10")
    with tfds.testing.mock_data(num_examples=48):
        results = train_briefly(tiny_config, tmp_path / "run")
    assert {"eval/image_zeroshot_top1", "eval/image2text_recall@1"} <= results.keys()
    assert 0 <= results["eval/image_zeroshot_top1"] <= 1


# Iterates a CSV training stream in its own process: restores the grain iterator
# state from argv[3] if given, takes argv[2] batches, writes them to argv[4] and the
# state after them to argv[5] (if given).
ITERATE = """
import json, sys
import grain, numpy as np, orbax.checkpoint as ocp
from bigalign.data import pipeline, synthetic, tokenizer
config = pipeline.default_config()
config.update(json.loads(sys.argv[1]))
tok = tokenizer.train_tokenizer(synthetic.caption_corpus(), sys.argv[4] + ".tok", 64)
iterator = iter(pipeline.train_dataset(config, tok, max_len=8, global_batch_size=4, seed=5))
checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
if sys.argv[3]:
    checkpointer.restore(sys.argv[3], args=grain.checkpoint.CheckpointRestore(iterator))
batches = [next(iterator) for _ in range(int(sys.argv[2]))]
if len(sys.argv) > 5:
    checkpointer.save(sys.argv[5], args=grain.checkpoint.CheckpointSave(iterator))
np.savez(sys.argv[4], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
iterator.close()
"""


def iterate_in_subprocess(config: dict, count: int, output, restore="", save=None) -> dict:
    args = [sys.executable, "-c", ITERATE, json.dumps(config), str(count), str(restore), str(output)]
    result = subprocess.run(args + ([str(save)] if save else []), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(output))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_fresh_process_continues_the_exact_stream(tmp_path, num_workers):
    rng = np.random.default_rng()
    index = write_image_folder(tmp_path / "data", 24, rng, truncated={int(rng.integers(24))})
    config = {"name": f"csv:{index}", "image_size": 16, "num_workers": num_workers,
              "max_skipped_fraction": 0.1}
    head, tail = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    whole = iterate_in_subprocess(config, head + tail, tmp_path / "whole.npz")
    first = iterate_in_subprocess(config, head, tmp_path / "first.npz", save=tmp_path / "state")
    rest = iterate_in_subprocess(config, tail, tmp_path / "rest.npz", restore=tmp_path / "state")
    resumed = {**first, **{f"{int(k.split('/')[0]) + head}/{k.split('/')[1]}": v
                           for k, v in rest.items()}}
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key], err_msg=key)
