"""Convert image-text pairs (a CSV index or WebDataset tars) into bigalign's ArrayRecord shards.

    python tools/make_array_record.py --csv index.csv --output /data/cc3m --num_shards 8
    python tools/make_array_record.py --tars "/data/shards/*.tar" --output /data/cc3m

Writes PREFIX-00000-of-0000N.array_record, ... (all or none of them). Pairs whose
image is missing, or that lack an image or a caption, are skipped and reported.
Point `data.name` at 'array_record:PREFIX-*.array_record' to train on them.
"""

import argparse
import glob
import sys

from bigalign.data import array_record
from bigalign.data.csv_source import CsvSource
from bigalign.errors import UserError


def read_examples(args, tally: array_record.Tally):
    """The examples named on the command line, as `array_record.write_shards` takes them."""
    if args.csv:
        source = CsvSource(args.csv, image_column=args.image_column,
                           text_column=args.text_column, separator=args.separator)
        return array_record.examples_from_csv(source, tally)
    paths = sorted(glob.glob(args.tars))
    if not paths:
        raise UserError(f"no tar files match {args.tars!r}; pass a glob such as '/data/*.tar' to --tars")
    return array_record.examples_from_tars(paths, tally)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--csv", help="CSV/TSV index with an image path column and a caption column")
    inputs.add_argument("--tars", help="glob of WebDataset tar shards (KEY.jpg + KEY.txt)")
    parser.add_argument("--image_column", default="filepath", help="CSV column of image paths")
    parser.add_argument("--text_column", default="caption", help="CSV column of captions")
    parser.add_argument("--separator", default="", help="CSV separator (default: tab for .tsv, else comma)")
    parser.add_argument("--output", required=True, help="shard path prefix")
    parser.add_argument("--num_shards", type=int, default=1, help="number of shards to write")
    args = parser.parse_args(argv)
    tally = array_record.Tally()
    try:
        paths = array_record.write_shards(read_examples(args, tally), args.output, args.num_shards)
    except (OSError, UserError) as error:
        print(f"make_array_record: error: {error}", file=sys.stderr)
        return 1
    skipped = f"skipped {tally.skipped}"
    if tally.first_skipped:
        more = ", ..." if tally.skipped > len(tally.first_skipped) else ""
        skipped += f": {', '.join(tally.first_skipped)}{more}"
    print(f"wrote {tally.passed} records to {len(paths)} shards "
          f"({args.output}-*-of-{len(paths):05d}.array_record); {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
