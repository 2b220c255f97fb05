"""Extension points: a loss, a tower kind and an evaluator registered from outside the
package, and hooks added from Python, each used by a real training run."""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import bigalign
from bigalign import config as config_lib, evaluators, hooks, objectives, train
from bigalign.data import sources
from bigalign.data.skipping import SKIPPED
from bigalign.errors import UserError
from bigalign.models import encoders


def read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def registered():
    """Registers entries for one test and removes them after it."""
    added = []

    def register(registry, name, entry):
        registry.register(name, entry)
        added.append((registry, name))
        return entry

    yield register
    for registry, name in added:
        del registry._entries[name]


def positive_cosine_loss(outputs, batch, context):
    """Minus the mean cosine of the positive pairs; reports the text token count it saw."""
    image, text = outputs["embeddings"]["image"], outputs["embeddings"]["text"]
    tokens = outputs["tokens"]["text"]  # [B, L, W]: token-level outputs reach the loss
    real = jnp.sum(batch["text"] != 0)  # and so does the batch
    return -jnp.mean(jnp.sum(image * text, axis=-1)), {
        "train/token_rows": jnp.asarray(tokens.shape[0] * tokens.shape[1], jnp.float32),
        "train/real_tokens": real.astype(jnp.float32),
    }


def test_a_loss_registered_outside_the_package_trains(tiny_config, tmp_path, registered):
    registered(objectives.LOSSES, "positive_cosine", positive_cosine_loss)
    tiny_config.loss.name = "positive_cosine"
    tiny_config.total_steps, tiny_config.log_every = 2, 1
    tiny_config.optimizer.warmup_steps = 1
    train.train_and_evaluate(tiny_config, str(tmp_path))
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]

    # The loss of step 1, computed here from the initial parameters and the first batch.
    run = bigalign.build(tiny_config, str(tmp_path))
    params = run.init_state().params
    first = next(iter(run.train_data()))
    first.pop(SKIPPED)
    outputs = run.model.apply({"params": params}, first)
    image, text = (np.asarray(outputs["embeddings"][m], np.float64) for m in ("image", "text"))
    expected = -np.mean(np.sum(image * text, axis=-1))
    np.testing.assert_allclose(records[0]["train/loss"], expected, rtol=1e-5)
    assert records[0]["train/token_rows"] == tiny_config.batch_size * tiny_config.text.max_len
    assert records[0]["train/real_tokens"] == np.sum(first["text"] != 0)
    assert records[1]["train/loss"] != records[0]["train/loss"]  # it trained


class BagOfWords(nn.Module):
    """A text encoder without attention: the mean of the token embeddings."""

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str
    dropout_rate: float
    dtype: object
    remat: str
    scan_layers: bool

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        x = nn.Embed(self.vocab_size, self.width, name="token_embed")(tokens)  # [B, L, W]
        mask = (tokens != 0)[..., None]
        return encoders.EncoderOutput((x * mask).sum(1) / jnp.maximum(mask.sum(1), 1), x)


def test_a_tower_kind_registered_outside_the_package_trains(tiny_config, tmp_path, registered):
    registered(encoders.ENCODERS, "bag_of_words", encoders.EncoderKind(
        BagOfWords, options=dict(pool="mean"), poolings=("mean",),
        embedding_flops=lambda tower, shape: (0, shape[0]), context=("vocab_size", "max_len"),
    ))
    tiny_config.model.text = config_lib.tower_config("bag_of_words", width=32, depth=0)
    tiny_config.total_steps, tiny_config.log_every = 2, 1
    train.train_and_evaluate(tiny_config, str(tmp_path))
    saved = bigalign.load(str(tmp_path)).params["text"]["encoder"]
    assert set(saved) == {"token_embed"}  # the registered encoder, not the Transformer
    with pytest.raises(Exception, match="model.text.pool='last' is unknown; valid: mean"):
        tiny_config.model.text.pool = "last"
        config_lib.validate(tiny_config)


class RecordSteps(hooks.Hook):
    def __init__(self, every, stop_at=None):
        self.every, self.stop_at = every, stop_at
        self.called, self.ended = [], False

    def __call__(self, loop):
        assert int(loop.state.step) == loop.step and "train/loss" in loop.metrics
        self.called.append(loop.step)
        if loop.step == self.stop_at:
            loop.stop = True

    def end(self, loop):
        self.ended = True


def test_an_evaluator_and_a_hook_added_from_outside_run_at_their_every(
        tiny_config, tmp_path, registered):
    def mean_positive_cosine(context, options):
        pairs = context.pairs(options.data)
        image, text = pairs.embeddings["image"], pairs.embeddings["text"]
        return {"value": float(np.mean(np.sum(image * text, axis=-1)))}

    registered(evaluators.EVALUATORS, "mean_positive_cosine",
               evaluators.EvaluatorKind(mean_positive_cosine, options={"data": ""}))
    tiny_config.evals = ml_collections.ConfigDict({
        "retrieval": evaluators.entry("retrieval"),  # only at the end
        "cosine": evaluators.entry("mean_positive_cosine", every=4),
    })
    tiny_config.total_steps, tiny_config.log_every = 10, 5
    hook = RecordSteps(every=3)
    results = train.train_and_evaluate(tiny_config, str(tmp_path), hooks=[hook])
    assert hook.called == [3, 6, 9, 10] and hook.ended  # every 3 steps, and after the last
    evaluated = [r for r in read_metrics(tmp_path) if "eval/cosine/value" in r]
    assert [r["step"] for r in evaluated] == [4, 8, 10]  # every 4 steps, and at the end
    assert not any("eval/retrieval/image2text_recall@1" in r for r in evaluated[:2])
    assert "eval/retrieval/image2text_recall@1" in results
    assert not any(key.startswith("eval/zeroshot") for key in results)  # only configured ones

    # The same number from the public API on the raw held-out examples.
    model = bigalign.load(str(tmp_path))
    source = sources.open_source(model.config.data, "shapes", model.config.data.eval_split)
    examples = [source[i] for i in range(model.config.data.num_eval)]
    image = model.embed_image(np.stack([e["image"] for e in examples]))
    text = model.embed_text([e["caption"] for e in examples])
    expected = float(np.mean(np.sum(image * text, axis=-1)))
    assert results["eval/cosine/value"] == pytest.approx(expected, rel=1e-6)


def test_an_unknown_evaluator_kind_is_a_one_line_error(tiny_config):
    tiny_config.evals.zeroshot.kind = "zero_shot"
    with pytest.raises(UserError, match=r"evals.zeroshot.kind='zero_shot' is unknown; valid: "
                                        r"geometry, linear_probe, retrieval, zeroshot"):
        config_lib.validate(tiny_config)
    tiny_config.evals.zeroshot = evaluators.entry("zeroshot")
    tiny_config.evals.zeroshot.unlock()
    tiny_config.evals.zeroshot.recall_at = (1,)  # an option of another kind
    with pytest.raises(UserError, match=r"unknown config key 'evals.zeroshot.recall_at'"):
        config_lib.validate(tiny_config)


def test_a_hook_can_stop_the_run_which_then_resumes(tiny_config, tmp_path, capsys):
    tiny_config.total_steps, tiny_config.checkpoint_every = 12, 10
    results = train.train_and_evaluate(tiny_config, str(tmp_path), hooks=[RecordSteps(1, stop_at=4)])
    assert results == {}
    assert "Stopped by a stop request" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "4").is_dir()  # saved on the stop, not only every 10
    resumed = RecordSteps(every=1)
    results = train.train_and_evaluate(tiny_config, str(tmp_path), hooks=[resumed])
    assert resumed.called == list(range(5, 13)) and "eval/retrieval/image2text_recall@1" in results


def test_the_readme_loss_example_trains_through_config_imports(tiny_config, tmp_path, monkeypatch):
    """The worked example in README.md, as a user's module named in config.imports."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        readme = f.read()
    example = readme.split("```python\n# my_losses.py")[1].split("```")[0]
    assert len(example.strip().splitlines()) < 20
    (tmp_path / "my_losses.py").write_text("# my_losses.py" + example)
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_config.imports = ("my_losses",)
    tiny_config.loss.name = "hardest_negative"
    tiny_config.total_steps, tiny_config.log_every = 2, 1
    try:
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    finally:
        objectives.LOSSES._entries.pop("hardest_negative", None)
    records = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert all("train/hardest_negative_margin" in r for r in records) and len(records) == 2
