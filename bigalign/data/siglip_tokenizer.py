"""SigLIP's tokenizer: a sentencepiece model used as big_vision feeds its SigLIP text towers.

The facts, from google-research/big_vision (commit 0127fb6, May 2025):

- the released SigLIP checkpoints tokenize with
  `tokenize(max_len=SEQLEN, model=..., eos="sticky", pad_value=1)`, `model` being
  "c4_en" (T5's English sentencepiece model, gs://t5-data/vocabs/cc_en.32000, vocab
  32,000) or "mc4" (the multilingual one, vocab 250,000) and SEQLEN 64 (16 for
  So400m/14 at 224 px) (big_vision/configs/proj/image_text/SigLIP_demo.ipynb; the
  same op in configs/proj/image_text/common.py's COCO retrieval);
- that op (big_vision/pp/ops_text.py, `get_pp_tokenize` and `tokenize`) lowercases
  first (`lower=True` by default, with `tf.strings.lower`, whose default encoding
  lowercases ASCII letters only), encodes with the model as it is (no sampling, no
  BOS), appends EOS, and with eos="sticky" cuts a text too long to its first
  max_len - 1 pieces followed by EOS, and pads with id 1;
- in both T5 vocabularies id 0 is <pad>, 1 is </s> (EOS) and 2 is <unk>, so the
  padding repeats EOS and the last position always holds EOS: the SigLIP text tower
  pools there (`pool_type="last"`, big_vision/models/proj/image_text/text_transformer.py).

A model whose EOS is not id 1 would make that padding a real piece, so it is refused.
SigLIP 2 (Gemma's tokenizer, the `tok` op) is a different convention, not this one.
"""

import string

import numpy as np

from bigalign.data.tokenizer import SentencepieceTokenizer
from bigalign.errors import UserError

PAD_ID = 1  # big_vision's pad_value=1: the EOS id of the T5 vocabularies
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
FILE_HINT = ("give the path of the sentencepiece model the checkpoint was trained with "
             "(big_vision's c4_en: gs://t5-data/vocabs/cc_en.32000/sentencepiece.model; "
             "mc4 for the i18n models)")


class SiglipTokenizer(SentencepieceTokenizer):
    """A sentencepiece model with big_vision's SigLIP conventions: ASCII-lowercased
    texts, EOS, padding with id 1 (the EOS again)."""

    PAD_ID = PAD_ID
    FILE_NAME = "sentencepiece.model"
    FILE_HINT = FILE_HINT

    def check_model(self, source: str) -> None:
        if self._processor.eos_id() != PAD_ID:
            raise UserError(
                f"text.tokenizer={source!r} has eos_id={self._processor.eos_id()}; SigLIP pads "
                f"with id {PAD_ID}, which must be the EOS (as in T5's c4_en and mc4); {FILE_HINT}")

    def prepare(self, texts) -> list[str]:
        return [str(text).translate(ASCII_LOWER) for text in texts]

    def decode(self, ids: np.ndarray) -> list[str]:
        """Texts from ids [N, L], up to the first EOS (for debugging and tests)."""
        texts = []
        for row in np.asarray(ids).tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            texts.append(self._processor.decode(row))
        return texts
