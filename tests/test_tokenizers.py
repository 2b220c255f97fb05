"""Tests for the tokenizers of published checkpoints: CLIP's BPE against open_clip itself,
SigLIP's sentencepiece use against big_vision's documented convention, and their selection
by text.tokenizer_kind."""

import gzip
import pickle

import numpy as np
import open_clip
import pytest
import sentencepiece as spm

from bigalign import builder, config as config_lib
from bigalign.data import clip_tokenizer, siglip_tokenizer, synthetic, tokenizer_kinds
from bigalign.errors import UserError
from helpers import random_seed

MERGES_PATH = open_clip.tokenizer.default_bpe()  # the merges file open_clip ships

TRICKY_TEXTS = [
    "A photo of a CAT.",
    "un café crème à Zürich, naïve façade",  # accents
    "東京タワーの夜景",  # CJK
    "a dog 🐶 and a rocket 🚀👩‍🚀",  # emoji, with a zero-width joiner
    "Tom &amp; Jerry &lt;3 &amp;amp;",  # HTML entities, one escaped twice
    "<b>fish &amp;amp; chips</b>",  # looks like HTML, so ftfy leaves the entities alone
    "wow!!! really?! ... --- ***",  # punctuation runs
    "!",
    "price!$ ok!~",  # "!" inside a run is id 0, the same as padding
    "hello! world!",
    "it's what we're doing, they'll see; I'd've",  # contractions
    "IT'S LOUD",  # contractions after lowercasing
    "3.14159 and 2026-12-03, 1,000,000",  # digits split one by one
    "   extra \t whitespace \n\n everywhere   ",
    "",
    "schÃ¶n",  # mojibake that ftfy repairs
    "rock’n’roll “quoted”",  # typographic quotes
    "the end <end_of_text> of it",  # the special string, between words
    " ".join(["many words"] * 60),  # longer than 77 tokens
]


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer.ClipTokenizer.load(MERGES_PATH)


def open_clip_ids(texts, context_length=77) -> np.ndarray:
    return open_clip.tokenize(texts, context_length=context_length).numpy()


# --- CLIP ------------------------------------------------------------------------


def test_clip_ids_equal_open_clip_on_tricky_strings(clip):
    ids = clip.encode(TRICKY_TEXTS, max_len=77)
    assert ids.dtype == np.int32 and ids.shape == (len(TRICKY_TEXTS), 77)
    np.testing.assert_array_equal(ids, open_clip_ids(TRICKY_TEXTS))
    assert (clip.vocab_size, clip.eos_id, clip.sot_id, clip.pad_id) == (49408, 49407, 49406, 0)


def test_clip_cuts_like_open_clip_at_smaller_lengths(clip):
    for max_len in (1, 2, 5, 16):
        np.testing.assert_array_equal(clip.encode(TRICKY_TEXTS, max_len=max_len),
                                      open_clip_ids(TRICKY_TEXTS, context_length=max_len))
    long_row = clip.encode([TRICKY_TEXTS[-1]], max_len=77)[0]
    assert long_row[-1] == clip.eos_id and np.count_nonzero(long_row == clip.eos_id) == 1


def test_clip_exclamation_mark_in_a_run_is_id_zero_like_padding(clip):
    row = clip.encode(["!$"], max_len=5)[0]
    np.testing.assert_array_equal(row, [49406, 0, 259, 49407, 0])  # "!", "$</w>", EOT, pad


def test_clip_ids_equal_open_clip_on_random_strings(clip):
    rng = np.random.default_rng(random_seed())
    alphabet = list("abcXYZ éüßÆ東京猫🐱!?.,'-&;0123456789 \t") + ["&amp;", "'s", "'re", "  "]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(64)]
    max_len = int(rng.integers(2, 78))
    np.testing.assert_array_equal(clip.encode(texts, max_len=max_len),
                                  open_clip_ids(texts, context_length=max_len))


def test_clip_pickles_decodes_and_saves(clip, tmp_path):
    texts = ["A photo of a café!", "two  dogs"]
    copy = pickle.loads(pickle.dumps(clip))  # as grain hands it to worker processes
    np.testing.assert_array_equal(copy.encode(texts, 77), open_clip_ids(texts))
    assert clip.decode(clip.encode(texts, 77)) == ["a photo of a café !", "two dogs"]
    saved = tokenizer_kinds.save_into(clip, str(tmp_path / "workdir"))
    assert saved.name == "bpe_simple_vocab_16e6.txt.gz"
    assert saved.read_bytes() == open(MERGES_PATH, "rb").read()


def test_a_file_that_is_not_clip_merges_is_a_user_error(tmp_path):
    not_gzip = tmp_path / "vocab.txt"
    not_gzip.write_text("i n\nt h\n")
    with pytest.raises(UserError, match=r"is not a gzipped BPE merges file .*bpe_simple_vocab"):
        clip_tokenizer.ClipTokenizer.load(str(not_gzip))
    too_short = tmp_path / "short.txt.gz"
    too_short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h"))
    with pytest.raises(UserError, match=r"is not CLIP's BPE merges file: it needs 48894 lines"):
        clip_tokenizer.ClipTokenizer.load(str(too_short))


# --- SigLIP ----------------------------------------------------------------------


def test_siglip_sticky_eos_and_padding_one_as_big_vision_documents(t5_style_model):
    # big_vision/pp/ops_text.py, get_pp_tokenize, case `eos="sticky", pad_value=1`
    # with max_len=3: "a" -> [a, 1, 1], "aa" -> [a, a, 1], "aaa" -> [a, a, 1].
    processor = spm.SentencePieceProcessor(model_file=t5_style_model)
    word = next(w for w in ("circle", "red", "square") if len(processor.encode(w)) == 1)
    (piece,) = processor.encode(word)
    tok = siglip_tokenizer.SiglipTokenizer.load(t5_style_model)
    ids = tok.encode([word, f"{word} {word}", f"{word} {word} {word}", ""], max_len=3)
    np.testing.assert_array_equal(ids, [[piece, 1, 1], [piece, piece, 1], [piece, piece, 1],
                                        [1, 1, 1]])
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 1, processor.get_piece_size())


def test_siglip_matches_the_processor_on_captions_and_cuts_keeping_eos(t5_style_model):
    processor = spm.SentencePieceProcessor(model_file=t5_style_model)
    tok = siglip_tokenizer.SiglipTokenizer.load(t5_style_model)
    rng = np.random.default_rng(random_seed())
    texts = [" ".join(rng.choice(synthetic.caption_corpus(), size=rng.integers(1, 4)))
             for _ in range(16)]
    max_len = int(rng.integers(4, 24))
    ids = tok.encode(texts, max_len=max_len)
    for row, text in zip(ids, texts):
        pieces = processor.encode(text)  # the captions are lowercase already
        if len(pieces) + 1 >= max_len:
            np.testing.assert_array_equal(row, pieces[: max_len - 1] + [1])
        else:
            np.testing.assert_array_equal(row[: len(pieces)], pieces)
            assert np.all(row[len(pieces):] == 1)  # EOS, then padding 1


def test_siglip_lowercases_ascii_only_like_tf_strings_lower(t5_style_model):
    # big_vision lowercases with tf.strings.lower, whose default encoding ('') lowercases
    # ASCII letters only: "É" stays "É".
    processor = spm.SentencePieceProcessor(model_file=t5_style_model)
    tok = siglip_tokenizer.SiglipTokenizer.load(t5_style_model)
    ids = tok.encode(["RED Blue ÉLAN Zürich"], max_len=32)[0]
    expected = processor.encode("red blue Élan zürich")
    assert processor.encode("red blue élan zürich") != expected  # É and é are different pieces
    np.testing.assert_array_equal(ids[: len(expected) + 1], expected + [1])


def test_siglip_pickles_and_refuses_a_model_whose_eos_is_not_one(t5_style_model, tokenizer):
    tok = siglip_tokenizer.SiglipTokenizer.load(t5_style_model)
    texts = ["a red circle", "a blue square"]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok)).encode(texts, 8),
                                  tok.encode(texts, 8))
    assert tok.decode(tok.encode(texts, 8)) == texts
    with pytest.raises(UserError, match=r"has eos_id=2; SigLIP pads with id 1"):
        siglip_tokenizer.SiglipTokenizer(tokenizer.model_proto)  # bigalign's own: EOS 2
    with pytest.raises(UserError, match=r"is not a sentencepiece model"):
        siglip_tokenizer.SiglipTokenizer(b"not a model")


# --- selection -------------------------------------------------------------------


def test_builder_loads_the_configured_kind(t5_style_model):
    config = config_lib.base_config()
    config.text.tokenizer_kind, config.text.tokenizer = "clip", MERGES_PATH
    assert isinstance(builder.load_tokenizer(config, None), clip_tokenizer.ClipTokenizer)
    config.text.tokenizer_kind, config.text.tokenizer = "siglip", t5_style_model
    assert isinstance(builder.load_tokenizer(config, None), siglip_tokenizer.SiglipTokenizer)
    config.text.tokenizer_kind, config.text.tokenizer = "sentencepiece", ""
    assert builder.load_tokenizer(config, None) is None  # random inputs, as before


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_published_kind_without_its_file_is_a_user_error(kind):
    config = config_lib.base_config()
    config.text.tokenizer_kind = kind
    with pytest.raises(UserError, match=rf"text.tokenizer is empty but "
                                        rf"text.tokenizer_kind='{kind}' needs the file"):
        builder.load_tokenizer(config, "/tmp/unused_workdir")


def test_an_unknown_kind_is_a_config_error():
    config = config_lib.base_config()
    config.text.tokenizer_kind = "wordpiece"
    with pytest.raises(UserError, match=r"text.tokenizer_kind='wordpiece' must be one of "
                                        r"sentencepiece, clip, siglip"):
        config_lib.validate(config)
