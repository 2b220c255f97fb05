"""Import an open_clip / OpenAI CLIP ViT checkpoint as a bigalign workdir.

    python tools/import_open_clip.py --model ViT-B-32 --weights open_clip_model.safetensors \
        --workdir /runs/vit_b32 [--tokenizer bpe_simple_vocab_16e6.txt.gz]

--weights: a state dict as .safetensors (no torch needed) or .pt/.bin (torch, loaded
with weights_only=True). --model names the architecture, as open_clip does; use the
"-quickgelu" name for OpenAI's original weights. --tokenizer: CLIP's BPE merges file,
which open_clip ships (found there when open_clip is installed and it is left out).
The workdir then serves `bigalign.load`, `model.<tower>.init_from` and
`model.init_from`: see README.md, "Start from a published model".
"""

import argparse
import importlib.util
import pathlib
import sys

from bigalign.errors import UserError
from bigalign.published import imported_run, open_clip

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def open_clip_bpe_file() -> str:
    """The BPE merges file inside an installed open_clip package (not imported), or ""."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return ""
    path = pathlib.Path(spec.origin).parent / BPE_FILE
    return str(path) if path.is_file() else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    parser.add_argument("--weights", required=True, help=".safetensors, .pt or .bin state dict")
    parser.add_argument("--workdir", required=True, help="new bigalign workdir to write")
    parser.add_argument("--tokenizer", default="", help=f"CLIP's {BPE_FILE}")
    args = parser.parse_args(argv)
    try:
        tokenizer = args.tokenizer or open_clip_bpe_file()
        if not tokenizer:
            raise UserError(f"--tokenizer is needed: the path of CLIP's {BPE_FILE} (open_clip "
                            f"ships it in its package directory)")
        state = open_clip.read_state_dict(args.weights)
        config = open_clip.model_config(args.model, {k: v.shape for k, v in state.items()})
        imported_run.write_run(
            config, args.workdir,
            lambda like: open_clip.params_from_open_clip(state, like, args.weights), tokenizer)
    except (OSError, UserError) as error:
        print(f"import_open_clip: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.workdir}: open_clip {args.model} from {args.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
