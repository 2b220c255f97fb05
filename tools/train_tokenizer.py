"""Train a sentencepiece tokenizer for bigalign from a text file (one text per line).

    python tools/train_tokenizer.py --input captions.txt --output tok.model --vocab_size 1000

The model has the ids bigalign's text tower expects (pad=0, unk=1, eos=2, no BOS)
and is the same on every run for the same input. Point `text.tokenizer` at it.
With `--input` left out it writes the built-in shapes captions' tokenizer.
"""

import argparse
import sys

from bigalign.data import synthetic, tokenizer
from bigalign.errors import UserError


def read_lines(path: str) -> list[str]:
    """The non-empty lines of `path`, without their line endings."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="text file, one text per line (default: shapes captions)")
    parser.add_argument("--output", required=True, help="where to write the .model file")
    parser.add_argument(
        "--vocab_size", type=int, default=1000, help="upper bound on the vocabulary size"
    )
    args = parser.parse_args(argv)
    try:
        texts = read_lines(args.input) if args.input else synthetic.caption_corpus()
        model = tokenizer.train_tokenizer(texts, args.output, args.vocab_size)
    except (OSError, UserError) as error:
        print(f"train_tokenizer: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {model.vocab_size} pieces from {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
