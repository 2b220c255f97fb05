"""CLIP's byte-level BPE tokenizer, as open_clip's `SimpleTokenizer` encodes (OpenAI CLIP and
every open_clip text tower trained with it).

The BPE itself runs in HuggingFace `tokenizers`, built from the merges file open_clip ships
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). The conventions are open_clip's
(`open_clip/tokenizer.py`, version 3.3):

- cleaning, in Python: `ftfy.fix_text`, `html.unescape` twice, whitespace runs collapsed
  to one space, stripped, lowercased;
- the pre-split: a contraction ('s 't 're 've 'm 'll 'd), a run of letters, one digit, or
  a run of other non-space characters; each piece is byte-level encoded, and its last
  symbol carries the end-of-word suffix `</w>`;
- the vocabulary: 256 byte symbols, the same 256 with `</w>`, the first 48,894 merges,
  then <start_of_text> = 49406 and <end_of_text> = 49407 (49,408 ids);
- a row is <start_of_text>, the pieces, <end_of_text>, then 0s up to the context
  length (77 in every published model); a text too long is cut and its last kept
  token replaced by <end_of_text>.

Id 0 is both the padding and the symbol "!" where a punctuation run does not merge it
("!$" -> [0, 259]; a word-final "!" is "!</w>", 256), so the number of real tokens is
not the count of non-zero ids: open_clip's text tower pools at the argmax of the ids (the
<end_of_text>, the largest id). One known difference from open_clip: the strings
"<start_of_text>" / "<end_of_text>" written in a text become the special ids wherever
they occur, while open_clip's regex misses them right after punctuation ("!<end_of_text>").
"""

import gzip
import html
import zlib

import ftfy
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from bigalign import workdir as workdir_lib
from bigalign.errors import UserError

START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
PAD_ID = 0
NUM_MERGES = 49152 - 256 - 2  # open_clip keeps the first 48,894 merges of the file
END_OF_WORD = "</w>"
# open_clip's pre-split (applied to cleaned, lowercased text with single spaces).
PIECE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
FILE_HINT = ("give the path of open_clip's bpe_simple_vocab_16e6.txt.gz (it ships in the "
             "open_clip package: python -c 'import open_clip.tokenizer as t; print(t.default_bpe())')")


def clean(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, one space, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def byte_symbols() -> list[str]:
    """The 256 printable characters standing for the bytes 0..255 in byte-level BPE, in
    the order of CLIP's vocabulary (the printable Latin-1 bytes first, as themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(others))]


def read_merges(file_bytes: bytes, source: str) -> list[tuple[str, str]]:
    """The merges open_clip uses from a gzipped merges file (a version line, then one
    'left right' pair a line)."""
    try:
        lines = gzip.decompress(file_bytes).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
        raise UserError(f"text.tokenizer={source!r} is not a gzipped BPE merges file ({error}); "
                        f"{FILE_HINT}") from None
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) < NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise UserError(f"text.tokenizer={source!r} is not CLIP's BPE merges file: it needs "
                        f"{NUM_MERGES} lines of two symbols after the first; {FILE_HINT}")
    return merges


def build_bpe(merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline for cleaned text: split on spaces, then into pieces, then
    byte-level BPE with the end-of-word suffix; the special strings map to their ids."""
    symbols = byte_symbols()
    vocab = [*symbols, *(symbol + END_OF_WORD for symbol in symbols),
             *("".join(merge) for merge in merges), START_OF_TEXT, END_OF_TEXT]
    bpe = tokenizers.Tokenizer(models.BPE(
        vocab={token: i for i, token in enumerate(vocab)}, merges=merges,
        end_of_word_suffix=END_OF_WORD))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"),
        pre_tokenizers.Split(tokenizers.Regex(PIECE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.add_special_tokens([START_OF_TEXT, END_OF_TEXT])
    return bpe


class ClipTokenizer:
    """open_clip's tokenizer from its merges file; `encode` gives padded int32 id arrays."""

    FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

    def __init__(self, file_bytes: bytes, source: str = "<bytes>"):
        self._file_bytes = bytes(file_bytes)
        self._bpe = build_bpe(read_merges(self._file_bytes, source))
        self.sot_id = self._bpe.token_to_id(START_OF_TEXT)

    @classmethod
    def load(cls, merges_path: str) -> "ClipTokenizer":
        path = workdir_lib.path(merges_path)
        if not path.is_file():
            raise UserError(f"text.tokenizer={merges_path!r} does not exist; {FILE_HINT}")
        return cls(path.read_bytes(), merges_path)

    @property
    def vocab_size(self) -> int:
        return self._bpe.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return self._bpe.token_to_id(END_OF_TEXT)

    @property
    def file_bytes(self) -> bytes:
        """The merges file it was built from (to copy into a workdir)."""
        return self._file_bytes

    def encode(self, texts, max_len: int) -> np.ndarray:
        """Ids int32 [len(texts), max_len]: <start_of_text>, pieces, <end_of_text>, then 0.

        A text longer than max_len - 2 pieces is cut so that <end_of_text> is the last token.
        """
        if max_len < 1:
            raise UserError(f"max_len={max_len} must be at least 1 (room for <end_of_text>)")
        ids = np.full((len(texts), max_len), PAD_ID, np.int32)
        for row, text in enumerate(texts):
            # One text at a time: `encode_batch` starts a thread pool, which must not be
            # running when grain forks its worker processes.
            pieces = self._bpe.encode(clean(text), add_special_tokens=False).ids
            kept = [self.sot_id, *pieces][: max_len - 1] + [self.eos_id]
            ids[row, : len(kept)] = kept
        return ids

    def decode(self, ids: np.ndarray) -> list[str]:
        """Texts (cleaned, with a space after each word) from ids [N, L]: what lies between
        <start_of_text> and the first <end_of_text> (for debugging and tests)."""
        texts = []
        for row in np.asarray(ids).tolist():
            row = row[1:] if row and row[0] == self.sot_id else row
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            symbols = [self._bpe.id_to_token(i) for i in row]
            texts.append(decoders.ByteLevel().decode(symbols).replace(END_OF_WORD, " ").strip())
        return texts

    def __getstate__(self) -> dict:
        # Grain workers rebuild the BPE from the file's bytes.
        return {"file_bytes": self._file_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["file_bytes"])

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size})"
