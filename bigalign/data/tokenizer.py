"""Sentencepiece tokenizer: train on a corpus, load, and encode to fixed-length id arrays.

The text tower expects ids [N, max_len] with 0 = padding on the right and an
EOS token after the last piece (it pools at the last non-pad position), so every
model used here has pad_id=0, unk_id=1, eos_id=2 and no BOS.

Training is deterministic (one thread, no input sampling or shuffling), so the
same corpus gives the same model file on every run and every host. A `Tokenizer`
pickles as its serialized model, so grain worker processes can rebuild it.
`SentencepieceTokenizer` is what it shares with the SigLIP kind (siglip_tokenizer.py).
"""

import io
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from bigalign import workdir as workdir_lib
from bigalign.errors import UserError

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2

HOW_TO_CREATE = (
    "create one with `python tools/train_tokenizer.py --input texts.txt --output MODEL "
    "--vocab_size N`, or leave text.tokenizer empty to let the trainer build "
    "WORKDIR/tokenizer.model"
)


class SentencepieceTokenizer:
    """A sentencepiece model behind the tokenizer interface (tokenizer_kinds.py): `encode`
    gives its pieces, then EOS, then padding (`PAD_ID`), cut so that EOS stays last.

    Its kinds set `PAD_ID`, `FILE_NAME` and `FILE_HINT` (how to get the right file),
    check the model's special ids (`check_model`) and may rewrite the texts first
    (`prepare`). It pickles as the model's bytes, so grain workers rebuild it.
    """

    PAD_ID: int
    FILE_NAME: str
    FILE_HINT: str

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self._model_proto = bytes(model_proto)
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        except RuntimeError:
            raise UserError(f"text.tokenizer={source!r} is not a sentencepiece model; "
                            f"{self.FILE_HINT}") from None
        self.check_model(source)

    @classmethod
    def load(cls, model_path: str):
        """Reads a .model file (local or an object store path) as this kind."""
        path = workdir_lib.path(model_path)
        if not path.is_file():
            raise UserError(f"text.tokenizer={str(model_path)!r} does not exist; {cls.FILE_HINT}")
        return cls(path.read_bytes(), str(model_path))

    def check_model(self, source: str) -> None:
        """Raises UserError if the model's special ids break this kind's convention."""

    def prepare(self, texts: Sequence[str]) -> list[str]:
        """The texts as this kind's model reads them."""
        return list(texts)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.PAD_ID

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def file_bytes(self) -> bytes:
        """The serialized model, as in its .model file (to copy into a workdir)."""
        return self._model_proto

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Ids int32 [len(texts), max_len]: pieces, then EOS, then padding.

        A text longer than max_len - 1 pieces is cut so that EOS stays the last token.
        """
        if max_len < 1:
            raise UserError(f"max_len={max_len} must be at least 1 (room for the EOS token)")
        pieces = self._processor.encode(self.prepare(texts), out_type=int)
        ids = np.full((len(pieces), max_len), self.PAD_ID, np.int32)
        for row, text_ids in enumerate(pieces):
            kept = text_ids[: max_len - 1] + [self.eos_id]
            ids[row, : len(kept)] = kept
        return ids

    def __getstate__(self) -> dict:
        # The sentencepiece processor does not pickle; the model bytes rebuild it.
        return {"model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class Tokenizer(SentencepieceTokenizer):
    """bigalign's own convention: pad_id 0, an EOS piece (`train_tokenizer` makes such models)."""

    PAD_ID = PAD_ID
    FILE_NAME = "tokenizer.model"
    FILE_HINT = HOW_TO_CREATE

    def check_model(self, source: str) -> None:
        if self._processor.pad_id() != PAD_ID or self._processor.eos_id() < 0:
            raise UserError(
                f"text.tokenizer={source!r} has pad_id={self._processor.pad_id()}, "
                f"eos_id={self._processor.eos_id()}; bigalign needs pad_id={PAD_ID} and an EOS "
                f"piece: {HOW_TO_CREATE}"
            )

    @property
    def model_proto(self) -> bytes:
        """The serialized model, as written to a .model file."""
        return self._model_proto

    def decode(self, ids: np.ndarray) -> list[str]:
        """Texts from ids [N, L], dropping padding and EOS (for debugging and tests)."""
        specials = {PAD_ID, self.eos_id}
        return [
            self._processor.decode([int(i) for i in row if int(i) not in specials])
            for row in np.asarray(ids)
        ]


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int) -> Tokenizer:
    """Trains a BPE sentencepiece model on `texts`, writes it to `model_path` atomically.

    `vocab_size` is an upper bound: a corpus too small for it gives a smaller vocabulary.
    """
    sentences = [text for text in texts if text.strip()]
    if not sentences:
        raise UserError(f"no non-empty texts to train the tokenizer {model_path!r} on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            minloglevel=2,  # errors only (a `logstream` would need a real stderr file descriptor)
            model_type="bpe",  # unigram stops short of whole words on tiny, repetitive corpora
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # tiny corpora: fewer pieces instead of an error
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            bos_id=-1,
            # Determinism: read every sentence in order, train on one thread.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
        )
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1]
        raise UserError(f"training the tokenizer {model_path!r} failed: {message}") from None
    tokenizer = Tokenizer(model.getvalue())
    path = workdir_lib.path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_atomically(path, tokenizer.model_proto)  # readers see all of it or none
    return tokenizer


def load_or_train(
    model_path: str, texts_fn: Callable[[], Iterable[str]], vocab_size: int
) -> Tokenizer:
    """Loads `model_path` if it exists, else trains it on `texts_fn()` and writes it there."""
    if workdir_lib.path(model_path).is_file():
        return Tokenizer.load(model_path)
    return train_tokenizer(texts_fn(), model_path, vocab_size)
