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
import sentencepiece as spm

from bigalign import workdir as workdir_lib
from bigalign.errors import UserError

PAD_ID = 1  # big_vision's pad_value=1: the EOS id of the T5 vocabularies
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
FILE_HINT = ("give the path of the sentencepiece model the checkpoint was trained with "
             "(big_vision's c4_en: gs://t5-data/vocabs/cc_en.32000/sentencepiece.model; "
             "mc4 for the i18n models)")


class SiglipTokenizer:
    """A sentencepiece model with big_vision's SigLIP conventions; pickles as its model bytes."""

    FILE_NAME = "sentencepiece.model"

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self._model_proto = bytes(model_proto)
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        except RuntimeError:
            raise UserError(f"text.tokenizer={source!r} is not a sentencepiece model; "
                            f"{FILE_HINT}") from None
        if self._processor.eos_id() != PAD_ID:
            raise UserError(
                f"text.tokenizer={source!r} has eos_id={self._processor.eos_id()}; SigLIP pads "
                f"with id {PAD_ID}, which must be the EOS (as in T5's c4_en and mc4); {FILE_HINT}")

    @classmethod
    def load(cls, model_path: str) -> "SiglipTokenizer":
        path = workdir_lib.path(model_path)
        if not path.is_file():
            raise UserError(f"text.tokenizer={model_path!r} does not exist; {FILE_HINT}")
        return cls(path.read_bytes(), model_path)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def file_bytes(self) -> bytes:
        """The serialized model, as in its .model file (to copy into a workdir)."""
        return self._model_proto

    def encode(self, texts, max_len: int) -> np.ndarray:
        """Ids int32 [len(texts), max_len]: pieces of the ASCII-lowercased text, EOS, then
        padding (id 1, the EOS again). A text too long keeps max_len - 1 pieces and EOS."""
        if max_len < 1:
            raise UserError(f"max_len={max_len} must be at least 1 (room for the EOS token)")
        lowered = [str(text).translate(ASCII_LOWER) for text in texts]
        pieces = self._processor.encode(lowered, out_type=int)
        ids = np.full((len(pieces), max_len), PAD_ID, np.int32)
        for row, text_ids in enumerate(pieces):
            kept = text_ids[: max_len - 1] + [self.eos_id]
            ids[row, : len(kept)] = kept
        return ids

    def decode(self, ids: np.ndarray) -> list[str]:
        """Texts from ids [N, L], up to the first EOS (for debugging and tests)."""
        texts = []
        for row in np.asarray(ids).tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            texts.append(self._processor.decode(row))
        return texts

    def __getstate__(self) -> dict:
        # The sentencepiece processor does not pickle; the model bytes rebuild it.
        return {"model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    def __repr__(self) -> str:
        return f"SiglipTokenizer(vocab_size={self.vocab_size})"
