"""Using a trained model: `bigalign.load(workdir)`, the same in a notebook and a script.

    model = bigalign.load("/tmp/run")                 # latest checkpoint; step=N for another
    images = model.embed_image(pixels)               # uint8 [N, H, W, 3] -> [N, E], unit length
    texts = model.embed_text(["a red circle", ...])  # [M, E]
    scores = model.similarity(images, texts)         # cosine similarities [N, M]
    pixels = np.stack([model.preprocess(path) for path in paths])  # the eval-time transform

The model is rebuilt from the config saved in the workdir (`config.json`) and its
tokenizer, through the same builder as training, and embeds exactly as the trainer's
evaluation does (same compiled embedders, same batch size), so the embeddings are
the ones the evaluation used.
"""

import jax
import numpy as np

from bigalign import checkpoint, config as config_lib, evaluators, modalities
from bigalign.builder import Run, build
from bigalign.errors import UserError
from bigalign.models import towers


class Model:
    """A trained model: parameters of one checkpoint and the run they belong to."""

    def __init__(self, run: Run, params, step: int):
        self.run, self.params, self.step = run, params, step

    @property
    def config(self):
        return self.run.config

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def modalities(self) -> list[str]:
        return self.run.modalities

    @property
    def logit_scale(self) -> float:
        """The scale the loss uses: exp of the parameter, capped at model.max_logit_scale."""
        log_scale = jax.device_get(self.params["logit_scale"])
        return float(towers.capped_scale(log_scale, self.config.model.max_logit_scale))

    @property
    def logit_bias(self) -> float:
        return float(jax.device_get(self.params["logit_bias"]))

    def embed(self, modality: str, values) -> np.ndarray:
        """L2-normalised embeddings float32 [N, E] of `values` for the tower of `modality`."""
        if modality not in self.modalities:
            raise UserError(f"this model has no {modality!r} tower; it has {self.modalities}")
        kind = modalities.get(modality)
        context = self.run.prepare_context()
        inputs = kind.prepare(kind.from_user(values, context), context)
        return evaluators.embed_in_batches(self.run.embedders(self.params)[modality], inputs,
                                           self.config.eval.batch_size)

    def embed_image(self, images) -> np.ndarray:
        """uint8 pixels [N, H, W, 3] (or floats already in [-1, 1]) at the model's image size."""
        return self.embed("image", images)

    def embed_text(self, texts) -> np.ndarray:
        """A list of strings."""
        return self.embed("text", texts)

    def embed_audio(self, waveforms) -> np.ndarray:
        """Mono waveforms at data.audio.sample_rate ([N, S] or a list of 1-D arrays)."""
        return self.embed("audio", waveforms)

    def preprocess(self, picture) -> np.ndarray:
        """The evaluation transform of one picture (PIL image, path, bytes or uint8 [H, W, 3])
        -> uint8 [S, S, 3] at the model's image size: resize, then centre crop."""
        return modalities.get("image").preprocess(picture, self.config.data)

    @staticmethod
    def similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Cosine similarities [N, M] of two sets of embeddings (as unit vectors: dot products)."""
        return np.asarray(first) @ np.asarray(second).T


def load(workdir: str, step: int | None = None, *, config=None) -> Model:
    """The model trained in `workdir`, at its latest checkpoint or at `step`; with `config`,
    built from that instead of the saved one (which it may change only in keys that do
    not define the run, such as `evals`)."""
    saved = config_lib.load_saved(workdir)
    if saved is None:
        raise UserError(f"{workdir} holds no {config_lib.SAVED_CONFIG}: not a bigalign run, or "
                        f"one started before runs saved their config; train into it first")
    if config is not None:
        config_lib.check_resume(saved, config, workdir)
    run = build(config if config is not None else saved, workdir)
    params, step = checkpoint.load_params(workdir, run.abstract_state().params, step)
    return Model(run, params, step)
