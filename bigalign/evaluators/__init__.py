"""Evaluators: what a run measures about its model, each chosen by name in `config.evals`.

    config.evals.zeroshot.every = 500                   # a default entry, changed
    config.evals.coco = evaluators.entry("retrieval", every=1000, captions="all",
                                         match="owner", data="tfds:coco_captions/2017")
    --config.evals.geometry.every=100                   # on the command line

Each entry runs every `every` steps during training (0: only at the end) and after the
last step; its metrics are `eval/<entry name>/<metric>`. Its `kind` picks an evaluator
of the EVALUATORS registry, and its other keys are that evaluator's options, validated
against the evaluator's schema as a tower's keys are. Built in (one module each):
zeroshot, retrieval, linear_probe, geometry. A new one is a function and a
registration in any module the config imports (`config.imports`):

    @evaluators.register("mean_norm", options={"data": ""})
    def mean_norm(context, options):
        pairs = context.pairs(options.data)
        return {"image_norm": float(np.linalg.norm(pairs.embeddings["image"], axis=1).mean())}

An evaluator receives a `Context` (the run, the parameters evaluated, and the held-out
sets embedded with them) and returns {metric: float}, {} when the run has nothing it
can measure (e.g. zero-shot without a text tower).
"""

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from bigalign import schema as schema_lib, sharding
from bigalign.data import held_out, sources
from bigalign.registry import Registry
from bigalign.schema import Integer, Key, Registered

EVALUATORS = Registry("evaluator")


@dataclasses.dataclass(frozen=True)
class EvaluatorKind:
    """evaluate(context, options) -> {metric: float}, and the schema of its options."""

    evaluate: Callable
    options: dict


def register(name: str, *, options: dict) -> Callable:
    """Decorator: registers fn(context, options) as evaluator `name` with its `options`
    schema (schema.py), beyond the keys every entry has (kind, every)."""

    def decorator(function: Callable) -> Callable:
        EVALUATORS.register(name, EvaluatorKind(function, options))
        return function

    return decorator


def entry_schema(kind: str) -> dict:
    """Every key an entry of `kind` understands: kind, every and the evaluator's options."""
    return {"kind": Key(kind, Registered(EVALUATORS)),
            "every": Key(0, Integer(low=0)),  # steps between evaluations; 0: only at the end
            **EVALUATORS.get(kind).options}


def entry(kind: str, **overrides) -> ml_collections.ConfigDict:
    """A `config.evals` entry of evaluator `kind` with its defaults and `overrides`."""
    return schema_lib.defaults_with(entry_schema(kind), overrides, f"evaluators.entry: {kind} entries")


def embed_in_batches(embed_batch, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeds `inputs` [N, ...] with `embed_batch` in batches of `batch_size`: [N, E]."""
    padded = sharding.pad_rows(inputs, batch_size)  # every batch one shape: one compile
    embedded = [np.asarray(embed_batch(padded[i : i + batch_size]))
                for i in range(0, len(padded), batch_size)]
    return np.concatenate(embedded)[: len(inputs)]


class Context:
    """What evaluators read, for one set of parameters: the run (config, mesh, tokenizer)
    and its held-out sets embedded with them, each embedded once however many
    evaluators read it."""

    def __init__(self, run, params):
        self.run, self.params = run, params
        self.config, self.mesh = run.config, run.mesh
        self._embedders = run.embedders(params)
        self._sets = {}

    @property
    def modalities(self) -> list[str]:
        return self.run.modalities

    def embed(self, modality: str, inputs: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings [n, E] of prepared `inputs` [n, ...]."""
        return embed_in_batches(self._embedders[modality], inputs, self.config.eval.batch_size)

    def _cached(self, key, make):
        if key not in self._sets:
            self._sets[key] = make()
        return self._sets[key]

    def pairs(self, spec: str = "", *, all_captions: bool = False) -> held_out.EmbeddedSet | None:
        """The held-out pairs `spec` ("": the run's default, `held_out.pairs_spec`) embedded
        with every tower it provides; None when there are none."""
        data_config = self.config.data
        spec = spec or held_out.pairs_spec(data_config)
        if not spec:
            return None
        split = data_config.eval_split
        modalities = self._provided(spec)
        return self._cached(("pairs", spec, all_captions), lambda: held_out.embed_set(
            self.run, self.embed, spec, split, modalities=modalities, all_captions=all_captions))

    def classes(self, spec: str = "", split: str = "", *, limit: int | None = None):
        """The labelled set `spec` ("": `held_out.classes_spec`) at `split` ("":
        data.zeroshot_split), its non-text modalities embedded; None without one."""
        data_config = self.config.data
        spec = spec or held_out.classes_spec(data_config)
        if not spec:
            return None
        split = split or data_config.zeroshot_split
        modalities = tuple(m for m in self._provided(spec) if m != "text")
        if not modalities:
            return None
        return self._cached(("classes", spec, split, limit), lambda: held_out.embed_set(
            self.run, self.embed, spec, split, modalities=modalities, role="classes", limit=limit))

    def _provided(self, spec: str) -> tuple[str, ...]:
        """The run's towers whose inputs `spec` has: the others are not evaluated on it."""
        provided = sources.modalities(self.config.data, spec)
        return tuple(m for m in self.modalities if m in provided)

    def scalar(self, name: str) -> float:
        """A scalar parameter of the model ("logit_scale", "logit_bias"), as stored."""
        return float(jax.device_get(self.params[name]))


    def evaluate(self, names=None) -> dict:
        """The metrics {"eval/<entry>/<metric>": float} of the `config.evals` entries
        `names` (default: all)."""
        results = {}
        for name, entry in self.config.evals.items():
            if names is None or name in names:
                kind = EVALUATORS.get(entry.kind, f"evals.{name}.kind")
                metrics = kind.evaluate(self, entry)
                results.update({f"eval/{name}/{metric}": float(v) for metric, v in metrics.items()})
        return results

    def describe(self) -> str:
        """The held-out sets read so far, e.g. "shapes (test): 1000 examples, 24 classes"."""
        lines = []
        for key, embedded in self._sets.items():
            split = key[2] if key[0] == "classes" else self.config.data.eval_split
            towers = ", ".join(embedded.embeddings)
            line = f"{embedded.spec} ({split}): {embedded.count} examples of {towers}"
            if embedded.caption_owner is not None and len(embedded.caption_owner) != embedded.count:
                line += f", {len(embedded.caption_owner)} captions"
            if embedded.class_names is not None:
                line += (f", {len(embedded.class_names)} classes "
                         f"(chance {1 / len(embedded.class_names):.4f})")
            lines.append(line)
        return "; ".join(lines) or "no held-out data (data.eval_name, data.zeroshot_name)"


# The built-in evaluators register themselves on import.
from bigalign.evaluators import geometry, linear_probe, retrieval, zeroshot  # noqa: E402,F401
