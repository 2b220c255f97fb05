"""Which tokenizer a run uses: `text.tokenizer_kind` names the convention, `text.tokenizer`
its file.

- "sentencepiece": bigalign's own (tokenizer.py): pieces, EOS, padding 0; trained on
  the data's captions when no file is given.
- "clip": open_clip's byte-level BPE (clip_tokenizer.py) from its merges file, for
  OpenAI CLIP and open_clip checkpoints.
- "siglip": a sentencepiece model with big_vision's SigLIP conventions
  (siglip_tokenizer.py), for big_vision SigLIP checkpoints.

Every kind has the same interface: vocab_size, pad_id, eos_id, encode(texts, max_len)
-> int32 [N, max_len], decode, file_bytes, FILE_NAME, and pickles for grain workers.
"""

from etils import epath

from bigalign import workdir as workdir_lib
from bigalign.data import clip_tokenizer, siglip_tokenizer, tokenizer
from bigalign.errors import UserError

KINDS = {
    "sentencepiece": tokenizer.Tokenizer,
    "clip": clip_tokenizer.ClipTokenizer,
    "siglip": siglip_tokenizer.SiglipTokenizer,
}
# For text.tokenizer naming no file (config.py).
PATH_HINT = (f"{tokenizer.HOW_TO_CREATE}; with text.tokenizer_kind clip or siglip, the file "
             f"the checkpoint was trained with (bigalign/data/tokenizer_kinds.py)")
FILE_HINTS = {"sentencepiece": tokenizer.HOW_TO_CREATE, "clip": clip_tokenizer.FILE_HINT,
              "siglip": siglip_tokenizer.FILE_HINT}


def load(kind: str, path: str):
    """The tokenizer of `kind` from its file (the builder trains a sentencepiece model when
    there is none; the other kinds must be given the file their checkpoints used)."""
    if kind not in KINDS:
        raise UserError(f"text.tokenizer_kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
    if not path:
        raise UserError(f"text.tokenizer is empty but text.tokenizer_kind={kind!r} needs the "
                        f"file the checkpoint was trained with: {FILE_HINTS[kind]}")
    return KINDS[kind].load(path)


def save_into(tok, directory: str) -> epath.Path:
    """Writes the file `tok` was loaded from into `directory` (atomically) under its
    kind's usual name, e.g. to make an imported workdir self-contained; returns its path."""
    target = workdir_lib.path(directory) / type(tok).FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_atomically(target, tok.file_bytes)
    return target
