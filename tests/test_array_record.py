"""bigalign's ArrayRecord shards: the record format, writing shards, reading them, and the converter tool."""

import collections
import csv
import glob
import io
import os
import pickle
import subprocess
import sys
import tarfile

import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from bigalign.data import array_record
from bigalign.errors import UserError
from helpers import random_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "red", "cat", "über", "naïve", "日本", "on", "the", "mat", "🙂"]


def random_caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(1, 6)))


def random_examples(rng, count: int) -> list[dict]:
    return [
        {"image": rng.bytes(int(rng.integers(0, 200))), "caption": random_caption(rng), "origin": f"src/{i}"}
        for i in range(count)
    ]


def as_tuple(example: dict) -> tuple:
    return example["image"], example["caption"], example["origin"]


def png_bytes(rng) -> bytes:
    pixels = rng.integers(0, 256, size=(int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_record_round_trip():
    rng = np.random.default_rng(random_seed())
    for example in random_examples(rng, 20):
        assert array_record.decode_record(array_record.encode_record(example)) == example


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # a byte msgpack never uses
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"image": "not bytes", "caption": "c", "origin": "o"}),
    msgpack.packb({"image": b"x", "caption": "c"}),
])
def test_decode_rejects_what_is_not_a_record(data):
    with pytest.raises(array_record.RecordError):
        array_record.decode_record(data)


def test_encode_rejects_an_image_that_is_not_bytes():
    with pytest.raises(TypeError, match="bytes"):
        array_record.encode_record({"image": np.zeros((2, 2), np.uint8), "caption": "c", "origin": "o"})


def test_shards_hold_every_example_round_robin(tmp_path):
    rng = np.random.default_rng(random_seed())
    num_shards = int(rng.integers(2, 5))
    examples = random_examples(rng, int(rng.integers(3 * num_shards, 5 * num_shards)))
    paths = array_record.write_shards(iter(examples), str(tmp_path / "pairs"), num_shards)
    assert paths == sorted(glob.glob(str(tmp_path / "pairs-*.array_record")))
    assert paths[0].endswith(f"pairs-00000-of-{num_shards:05d}.array_record")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in paths]  # no temporaries left

    source = array_record.ArrayRecordSource(str(tmp_path / "pairs-*.array_record"))
    assert len(source) == len(examples)
    read = collections.Counter(as_tuple(source[i]) for i in range(len(source)))
    assert read == collections.Counter(map(as_tuple, examples))
    for shard, path in enumerate(paths):
        single = array_record.ArrayRecordSource(path)
        assert [single[i] for i in range(len(single))] == examples[shard::num_shards]
    assert source.captions() == [source[i]["caption"] for i in range(len(source))]


def test_a_failure_while_writing_leaves_no_shards(tmp_path):
    rng = np.random.default_rng(random_seed())
    examples = random_examples(rng, 10)
    fail_after = int(rng.integers(1, len(examples)))

    def failing():
        yield from examples[:fail_after]
        raise RuntimeError("reading the input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        array_record.write_shards(failing(), str(tmp_path / "pairs"), 3)
    assert os.listdir(tmp_path) == []


def test_writing_nothing_is_an_error_and_leaves_no_shards(tmp_path):
    with pytest.raises(UserError, match="no examples"):
        array_record.write_shards([], str(tmp_path / "pairs"), 2)
    assert os.listdir(tmp_path) == []


def test_a_corrupt_record_is_an_error_item_naming_its_origin(tmp_path):
    rng = np.random.default_rng(random_seed())
    good = random_examples(rng, 2)
    path = str(tmp_path / "mixed.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(array_record.encode_record(good[0]))
    writer.write(b"\xc1" + rng.bytes(30))
    writer.write(array_record.encode_record(good[1]))
    writer.close()

    source = array_record.ArrayRecordSource(path)
    assert source[0] == good[0] and source[2] == good[1]
    assert source[1]["origin"] == f"{path}#1"
    assert source[1]["error"].startswith("corrupt record")
    assert source.captions() == [good[0]["caption"], good[1]["caption"]]


def test_no_matching_files_is_a_one_line_user_error(tmp_path):
    pattern = str(tmp_path / "nothing-*.array_record")
    with pytest.raises(UserError) as error:
        array_record.ArrayRecordSource(pattern)
    assert pattern in str(error.value) and "make_array_record.py" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_array_record_is_a_user_error(tmp_path):
    path = tmp_path / "junk.array_record"
    path.write_bytes(np.random.default_rng(random_seed()).bytes(100))
    with pytest.raises(UserError, match="junk.array_record"):
        array_record.ArrayRecordSource(str(path))


def test_source_survives_pickling(tmp_path):
    examples = random_examples(np.random.default_rng(random_seed()), 7)
    array_record.write_shards(examples, str(tmp_path / "pairs"), 2)
    source = array_record.ArrayRecordSource(str(tmp_path / "pairs-*"))
    source[0]  # open a reader before pickling, as a used source has
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i] for i in range(len(copy))] == [source[i] for i in range(len(source))]


def test_tar_members_group_by_key():
    assert array_record.split_member_name("dir/000123.jpg") == ("dir/000123", "jpg")
    assert array_record.split_member_name("000123.seg.PNG") == ("000123", "seg.png")


def run_tool(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools/make_array_record.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )


def read_pairs(pattern: str) -> collections.Counter:
    source = array_record.ArrayRecordSource(pattern)
    return collections.Counter((source[i]["image"], source[i]["caption"]) for i in range(len(source)))


def test_tool_converts_a_csv_index_and_reports_missing_images(tmp_path):
    rng = np.random.default_rng(random_seed())
    os.makedirs(tmp_path / "images")
    rows, expected = [], collections.Counter()
    for i in range(6):
        image, caption = png_bytes(rng), random_caption(rng)
        (tmp_path / "images" / f"{i}.png").write_bytes(image)
        rows.append((f"images/{i}.png", caption))
        expected[(image, caption)] += 1
    rows.insert(int(rng.integers(0, len(rows))), ("images/missing.png", "never written"))
    with open(tmp_path / "index.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)

    result = run_tool("--csv", str(tmp_path / "index.csv"), "--output", str(tmp_path / "out" / "pairs"),
                      "--num_shards", "3")
    assert result.returncode == 0, result.stderr
    assert "wrote 6 records to 3 shards" in result.stdout
    assert "skipped 1" in result.stdout and "missing.png" in result.stdout
    assert read_pairs(str(tmp_path / "out" / "pairs-*-of-00003.array_record")) == expected


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tool_converts_tar_shards_and_skips_keys_without_a_caption(tmp_path):
    rng = np.random.default_rng(random_seed())
    expected = collections.Counter()
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(3):
                image, caption = png_bytes(rng), random_caption(rng)
                add_file(tar, f"part/{shard}{i:04d}.png", image)
                add_file(tar, f"part/{shard}{i:04d}.txt", f"  {caption}\n".encode("utf-8"))
                add_file(tar, f"part/{shard}{i:04d}.json", b"{}")
                expected[(image, caption)] += 1
            add_file(tar, f"part/{shard}9999.jpg", png_bytes(rng))

    result = run_tool("--tars", str(tmp_path / "shard-*.tar"), "--output", str(tmp_path / "pairs"))
    assert result.returncode == 0, result.stderr
    assert "wrote 6 records to 1 shards" in result.stdout
    assert "skipped 2" in result.stdout and "shard-0.tar:part/09999 (no caption)" in result.stdout
    assert read_pairs(str(tmp_path / "pairs-00000-of-00001.array_record")) == expected


def test_tool_errors_are_one_line(tmp_path):
    result = run_tool("--tars", str(tmp_path / "none-*.tar"), "--output", str(tmp_path / "pairs"))
    assert result.returncode == 1
    assert result.stderr.startswith("make_array_record: error: no tar files match")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []
