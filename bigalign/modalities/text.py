"""Text: int32 [max_len] token ids (pieces, EOS, then padding 0) from the sentencepiece tokenizer."""

import numpy as np

from bigalign.data.tokenizer import EOS_ID
from bigalign.errors import UserError
from bigalign.modalities import MODALITIES, Modality

FIRST_PIECE_ID = 3  # after pad (0), unk (1) and EOS (2)


class Text(Modality):
    dtype = np.int32
    raw_key = "caption"

    def input_shape(self, data_config, max_len):
        return (max_len,)

    def prepare(self, values, context):
        return context.tokenizer.encode([str(value) for value in values], context.max_len)

    def from_user(self, values, context):
        """A list of strings."""
        if isinstance(values, str):
            raise UserError("embed_text takes a list of strings; got one string: wrap it in [...]")
        values = list(values)
        if not values:
            raise UserError("no texts to embed: pass a non-empty list of strings")
        wrong = [value for value in values if not isinstance(value, str)]
        if wrong:
            raise UserError(f"embed_text takes strings; got {type(wrong[0]).__name__} {wrong[0]!r}")
        return values

    def random(self, data_config, max_len, vocab_size, batch_size, rng):
        """Rows of ids >= FIRST_PIECE_ID ending in EOS at a random length, then padding."""
        tokens = rng.integers(FIRST_PIECE_ID, vocab_size, size=(batch_size, max_len))
        lengths = rng.integers(1, max_len + 1, size=batch_size)
        tokens[np.arange(batch_size), lengths - 1] = EOS_ID
        tokens[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
        return tokens.astype(np.int32)


MODALITIES.register("text", Text())
