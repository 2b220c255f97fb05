"""bigalign's ArrayRecord format: image-text pairs packed into random-access shards.

One record per pair, a msgpack map {"image": the encoded image file's bytes,
unchanged, "caption": str, "origin": str}. Images are stored as the original
files' bytes (no re-encoding), so converting loses nothing; reading a shard
replaces the many small-file opens of a CSV index with reads from a few large
files. Shards are written with `group_size:1`, which grain needs for random access.

    write_shards(examples_from_csv(CsvSource("index.csv"), tally), "/data/cc3m", 8)
    source = ArrayRecordSource("/data/cc3m-*.array_record")

`tools/make_array_record.py` is the command-line front end.
"""

import dataclasses
import glob
import os
import tarfile
from collections.abc import Iterable, Iterator

import grain
import msgpack
from array_record.python.array_record_module import ArrayRecordWriter

from bigalign.data.csv_source import CsvSource
from bigalign.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# How many skipped examples a Tally remembers by name, for the summary line.
SHOWN_SKIPPED = 5


class RecordError(ValueError):
    """Bytes that are not a bigalign record (corrupt, truncated, or another format)."""


def encode_record(example: dict) -> bytes:
    """The record for {"image": encoded image bytes, "caption": str, "origin": str}."""
    image = example["image"]
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"a record stores the encoded image file's bytes, not {type(image).__name__}")
    return msgpack.packb(
        {"image": bytes(image), "caption": str(example["caption"]), "origin": str(example["origin"])},
        use_bin_type=True,
    )


def decode_record(data: bytes) -> dict:
    """The example in a record made by `encode_record`; raises RecordError on anything else."""
    try:
        example = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise RecordError(f"not msgpack: {error}") from error
    types = {"image": bytes, "caption": str, "origin": str}
    if not isinstance(example, dict) or set(example) != set(types):
        raise RecordError(f"expected a map with keys {sorted(types)}")
    for key, expected in types.items():
        if not isinstance(example[key], expected):
            raise RecordError(f"{key!r} is {type(example[key]).__name__}, not {expected.__name__}")
    return example


def shard_paths(output_prefix: str, num_shards: int) -> list[str]:
    """The shard names `write_shards` uses: PREFIX-00000-of-0000N.array_record, ..."""
    return [f"{output_prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def write_shards(examples: Iterable[dict], output_prefix: str, num_shards: int) -> list[str]:
    """Writes example j to shard j % num_shards and returns the shard paths.

    All-or-nothing: shards are written under temporary names and renamed only
    once every one is complete, so a failure never leaves shards that look
    finished. Raises UserError when there is nothing to write.
    """
    if num_shards < 1:
        raise UserError(f"num_shards is {num_shards}; set it to 1 or more")
    paths = shard_paths(output_prefix, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    temporary = [f"{path}.tmp-{os.getpid()}" for path in paths]
    writers = []
    try:
        writers = [ArrayRecordWriter(path, "group_size:1") for path in temporary]
        count = 0
        for count, example in enumerate(examples, start=1):
            writers[(count - 1) % num_shards].write(encode_record(example))
        for writer in writers:
            writer.close()
        if count == 0:
            raise UserError(f"no examples to write to {output_prefix!r}; check that the input "
                            f"lists readable images with captions")
        for source, destination in zip(temporary, paths):
            os.replace(source, destination)
    except BaseException:
        for writer in writers:
            if writer.is_open():
                writer.close()
        for path in temporary:
            if os.path.exists(path):
                os.remove(path)
        raise
    return paths


class ArrayRecordSource:
    """Random access to the pairs in ArrayRecord shards: {"image": bytes, "caption": str, "origin": str}.

    `pattern` is a glob or a single path; matching shards are read in sorted
    order. A record that cannot be decoded gives {"origin", "error"}, which the
    pipeline skips and counts.
    """

    def __init__(self, pattern: str):
        paths = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))
        if not paths:
            raise UserError(f"no ArrayRecord files match {pattern!r}; make shards with "
                            f"`python tools/make_array_record.py --csv INDEX --output PREFIX`")
        try:
            self._records = grain.sources.ArrayRecordDataSource(paths)
        except RuntimeError as error:
            reason = str(error).splitlines()[0]
            raise UserError(f"cannot read the ArrayRecord files matching {pattern!r} ({reason}); "
                            f"remake them with tools/make_array_record.py") from error
        self.pattern = pattern
        self.paths = paths

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        try:
            return decode_record(self._records[index])
        except RecordError as error:
            return {"origin": f"{self.pattern}#{index}", "error": f"corrupt record ({error})"}

    def captions(self) -> list[str]:
        """Every caption, in record order, leaving out corrupt records (for training a tokenizer)."""
        items = (self[i] for i in range(len(self)))
        return [item["caption"] for item in items if "error" not in item]

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.pattern!r}, {len(self.paths)} files, {len(self)} records)"


@dataclasses.dataclass
class Tally:
    """What a conversion read: examples passed on, examples skipped, and the first few skipped."""

    passed: int = 0
    skipped: int = 0
    first_skipped: list[str] = dataclasses.field(default_factory=list)

    def skip(self, origin: str, reason: str) -> None:
        self.skipped += 1
        if len(self.first_skipped) < SHOWN_SKIPPED:
            self.first_skipped.append(f"{origin} ({reason})")


def examples_from_csv(source: CsvSource, tally: Tally) -> Iterator[dict]:
    """The pairs of a CSV index with each image file's bytes; unreadable files are skipped into `tally`."""
    for index in range(len(source)):
        item = source[index]
        try:
            with open(item["image"], "rb") as f:
                image = f.read()
        except OSError as error:
            tally.skip(item["origin"], error.strerror or type(error).__name__)
            continue
        tally.passed += 1
        yield {"image": image, "caption": item["caption"], "origin": item["origin"]}


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): "dir/000123.jpg" -> ("dir/000123", "jpg")."""
    folder, _, basename = name.rpartition("/")
    stem, _, extension = basename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def examples_from_tars(paths: Iterable[str], tally: Tally) -> Iterator[dict]:
    """The pairs in WebDataset-style tar shards: an image file and a .txt caption sharing a key.

    Files of one example must be adjacent in the tar, as WebDataset writes them.
    Keys lacking an image or a caption are skipped into `tally`.
    """
    for path in paths:
        try:
            with tarfile.open(path, "r|*") as tar:
                yield from _examples_from_tar(path, tar, tally)
        except tarfile.TarError as error:
            raise UserError(f"{path!r} is not a readable tar file ({error}); "
                            f"pass WebDataset tar shards to --tars") from error


def _examples_from_tar(path: str, tar: tarfile.TarFile, tally: Tally) -> Iterator[dict]:
    """One tar's examples (see `examples_from_tars`), read as a stream."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        member_key, extension = split_member_name(member.name)
        if member_key != key:
            if key is not None:
                yield from _example(f"{path}:{key}", files, tally)
            key, files = member_key, {}
        if extension in IMAGE_EXTENSIONS + ("txt",):
            files.setdefault(extension, tar.extractfile(member).read())
    if key is not None:
        yield from _example(f"{path}:{key}", files, tally)


def _example(origin: str, files: dict[str, bytes], tally: Tally) -> Iterator[dict]:
    """The example made of one key's files, or nothing (counted in `tally`) when it is incomplete."""
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    if image is None:
        tally.skip(origin, "no image")
        return
    if "txt" not in files:
        tally.skip(origin, "no caption")
        return
    try:
        caption = files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        tally.skip(origin, "caption is not UTF-8")
        return
    tally.passed += 1
    yield {"image": image, "caption": caption, "origin": origin}
