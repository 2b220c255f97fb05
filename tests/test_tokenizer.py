"""Tests for bigalign.data.tokenizer and tools/train_tokenizer.py."""

import importlib.util
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from bigalign.data import synthetic, tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 128  # enough for whole-word pieces on the shapes captions


# --- tokenizer --------------------------------------------------------------------


def test_encode_appends_eos_and_pads(tokenizer):
    texts = list(np.random.choice(synthetic.caption_corpus(), size=16, replace=False))
    ids = tokenizer.encode(texts, max_len=16)
    assert ids.shape == (16, 16) and ids.dtype == np.int32
    assert tokenizer.pad_id == 0 and tokenizer.eos_id > 0
    lengths = (ids != tokenizer.pad_id).sum(axis=1)
    for row, length in zip(ids, lengths):
        assert row[length - 1] == tokenizer.eos_id  # EOS is the last real token
        assert np.all(row[length:] == tokenizer.pad_id)  # right padding
        assert np.sum(row == tokenizer.eos_id) == 1
    assert tokenizer.decode(ids) == texts  # nothing was cut


def test_every_shapes_caption_fits_the_demo_length(tokenizer):
    ids = tokenizer.encode(synthetic.caption_corpus(), max_len=64)
    assert (ids != 0).sum(axis=1).max() <= 16


def test_truncation_keeps_eos_last(tokenizer):
    text = " ".join(np.random.choice(synthetic.caption_corpus(), size=4))
    full = tokenizer.encode([text], max_len=128)[0]
    num_pieces = int((full != 0).sum()) - 1
    for max_len in (1, 2, num_pieces // 2):
        ids = tokenizer.encode([text], max_len=max_len)[0]
        np.testing.assert_array_equal(ids[:-1], full[: max_len - 1])
        assert ids[-1] == tokenizer.eos_id
    empty = tokenizer.encode([""], max_len=4)[0]
    np.testing.assert_array_equal(empty, [tokenizer.eos_id, 0, 0, 0])


def test_reload_and_pickle_give_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "copy.model"
    path.write_bytes(tokenizer.model_proto)
    texts = list(np.random.choice(synthetic.caption_corpus(), size=8))
    expected = tokenizer.encode(texts, max_len=12)
    for other in (tokenizer_lib.Tokenizer.load(str(path)), pickle.loads(pickle.dumps(tokenizer))):
        assert other.vocab_size == tokenizer.vocab_size
        np.testing.assert_array_equal(other.encode(texts, max_len=12), expected)


def test_training_is_deterministic_and_quiet(tmp_path, capfd):
    texts = synthetic.caption_corpus()
    first = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "a.model"), 100)
    second = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "b.model"), 100)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert first.model_proto == second.model_proto
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temporary left over
    assert capfd.readouterr() == ("", "")


def test_training_works_without_a_real_stderr(tmp_path, capsys):
    # Under pytest's capsys (or in notebooks) sys.stderr has no file descriptor.
    tokenizer_lib.train_tokenizer(synthetic.caption_corpus(), str(tmp_path / "t.model"), 64)
    assert (tmp_path / "t.model").exists()


def test_too_small_vocabulary_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="training the tokenizer .* failed: .*vocab") as error:
        tokenizer_lib.train_tokenizer(synthetic.caption_corpus(), str(tmp_path / "t.model"), 5)
    assert "\n" not in str(error.value) and not (tmp_path / "t.model").exists()


def test_missing_model_error_says_how_to_create_it(tmp_path):
    path = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="missing.model.*train_tokenizer.py"):
        tokenizer_lib.Tokenizer.load(path)


def test_a_file_that_is_not_a_model_or_has_no_pad_0_is_a_one_line_error(tmp_path):
    not_a_model = tmp_path / "notes.model"
    not_a_model.write_text("not a sentencepiece model\n")
    with pytest.raises(ValueError, match=r"notes.model' is not a sentencepiece model; .*train_tokenizer.py"):
        tokenizer_lib.Tokenizer.load(str(not_a_model))
    no_pad = tmp_path / "no_pad"  # sentencepiece's defaults: unk 0, BOS 1, EOS 2, no padding
    spm.SentencePieceTrainer.train(sentence_iterator=iter(synthetic.caption_corpus()),
                                   model_prefix=str(no_pad), vocab_size=64, minloglevel=2,
                                   hard_vocab_limit=False, num_threads=1)
    with pytest.raises(ValueError, match=r"no_pad.model' has pad_id=-1, eos_id=2; bigalign needs pad_id=0"):
        tokenizer_lib.Tokenizer.load(f"{no_pad}.model")


def test_load_or_train_trains_once(tmp_path):
    path = str(tmp_path / "nested" / "tok.model")
    calls = []

    def texts():
        calls.append(1)
        return synthetic.caption_corpus()

    first = tokenizer_lib.load_or_train(path, texts, VOCAB_SIZE)
    second = tokenizer_lib.load_or_train(path, texts, VOCAB_SIZE)
    assert len(calls) == 1 and first.model_proto == second.model_proto


def test_command_line_tool(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer_tool", os.path.join(REPO, "tools", "train_tokenizer.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    texts = ["the quick brown fox", "jumps over the lazy dog", "", "the end"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    output = tmp_path / "tok.model"
    status = tool.main(["--input", str(tmp_path / "texts.txt"), "--output", str(output),
                        "--vocab_size", "40"])
    assert status == 0
    model = tokenizer_lib.Tokenizer.load(str(output))
    assert model.decode(model.encode(texts, max_len=32)) == texts


