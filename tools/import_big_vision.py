"""Import a big_vision SigLIP checkpoint (.npz) as a bigalign workdir.

    python tools/import_big_vision.py --weights webli_en_b16_224_63724782.npz \
        --tokenizer cc_en.32000/sentencepiece.model --workdir /runs/siglip_b16 [--variant B/16]

--weights: the .npz big_vision saves (the released SigLIPs, or a run of your own);
its sizes, pooling and heads are read from the arrays, and --variant, when given, is
checked against them. --tokenizer: the sentencepiece model it was trained with
(c4_en, gs://t5-data/vocabs/cc_en.32000/sentencepiece.model, for the English SigLIPs).
The workdir then serves `bigalign.load`, `model.<tower>.init_from` and
`model.init_from`: see README.md, "Start from a published model".
"""

import argparse
import sys

from bigalign.errors import UserError
from bigalign.published import big_vision, imported_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="big_vision .npz checkpoint")
    parser.add_argument("--tokenizer", required=True, help="its sentencepiece .model file")
    parser.add_argument("--workdir", required=True, help="new bigalign workdir to write")
    parser.add_argument("--variant", default="", help="expected image variant, e.g. B/16")
    args = parser.parse_args(argv)
    try:
        state = big_vision.read_npz(args.weights)
        config = big_vision.model_config({k: v.shape for k, v in state.items()}, args.variant)
        imported_run.write_run(
            config, args.workdir,
            lambda like: big_vision.params_from_big_vision(state, like, args.weights), args.tokenizer)
    except (OSError, UserError) as error:
        print(f"import_big_vision: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.workdir}: big_vision SigLIP from {args.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
