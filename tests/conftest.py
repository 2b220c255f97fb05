"""Test setup: a simulated 8-device CPU mesh, configured before jax is imported, and seeds.

numpy's global RNG is seeded before each test from the session seed and the test's id, so a
failure reproduces with BIGALIGN_TEST_SEED=<seed> (shown in the header and the failure report)
and the same test selection.
"""

import atexit
import hashlib
import os
import secrets
import shutil
import tempfile

# LLVM's optimisation level 0: XLA's own passes (fusion, layout, sharding) are
# unchanged, but machine code is generated about 30% faster, and compiling is most of
# a small test's time.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole session, its xdist workers and the CLI runs they
# start: tests that build the same tiny model load its compiled step instead of
# compiling it again (most of a small test's time).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigalign-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (must come after XLA_FLAGS)

from bigalign import host_memory  # noqa: E402

# Huge pages for the xdist workers and the CLI runs the tests start, which then do not
# re-execute themselves for them (bigalign/host_memory.py, tests/test_host_memory.py).
if host_memory.needs_tunable():
    os.environ.update(host_memory.with_tunable(os.environ))

jax.config.update("jax_enable_x64", False)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("BIGALIGN_TEST_SEED", str(secrets.randbelow(2**32)))  # shared by workers
SEED = int(os.environ["BIGALIGN_TEST_SEED"])


def seed_for(nodeid: str) -> int:
    digest = hashlib.sha256(f"{SEED}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def pytest_report_header(config):
    return f"BIGALIGN_TEST_SEED={SEED}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    np.random.seed(seed_for(item.nodeid))  # before fixtures, which may draw too


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("seed", f"reproduce with BIGALIGN_TEST_SEED={SEED}"))
    return report


def make_tiny_config():
    """A config small enough that a train step compiles and runs in seconds on CPU."""
    from bigalign.config import base_config

    config = base_config()
    config.batch_size = 16
    config.total_steps = 20
    config.log_every = 5
    config.checkpoint_every = 10
    config.optimizer.warmup_steps = 2
    config.data.image_size = 16
    config.data.num_train = 256
    config.data.num_eval = 48
    config.text.max_len = 12
    config.model.embed_dim = 16
    for tower in (config.model.image, config.model.text):
        tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 32, 1, 2, 64
    config.eval.batch_size = 16
    return config


@pytest.fixture
def tiny_config():
    return make_tiny_config()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A whole-word sentencepiece model of the shapes captions (128 pieces)."""
    from bigalign.data import synthetic, tokenizer as tokenizer_lib

    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    return tokenizer_lib.train_tokenizer(synthetic.caption_corpus(), str(path), 128)


@pytest.fixture(scope="session")
def t5_style_model(tmp_path_factory) -> str:
    """A small sentencepiece model with T5's special ids (pad 0, EOS 1, unk 2), as
    big_vision's c4_en for SigLIP: the path of its .model file."""
    import sentencepiece as spm

    from bigalign.data import synthetic

    corpus = [*synthetic.caption_corpus(), "Élan élan ÉLAN", "Zürich zürich", "RED Blue"]
    path = tmp_path_factory.mktemp("siglip") / "sentencepiece.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(path.with_suffix("")),
        vocab_size=160, model_type="bpe", hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    return str(path)
