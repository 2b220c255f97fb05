"""Modalities: what each kind of input is, in one module per modality.

A modality (`image.py`, `text.py`, `audio.py`) says, in one place:
- `dtype` and `input_shape(data_config, max_len)`: what one example looks like on its
  way to the device (the input pipeline sends it, the model is initialised with it);
- `prepare(values, context)`: the host-side, per-batch preparation (tokenising,
  log-mel spectrograms), shared by the input pipeline and `bigalign.load`'s embedders;
- `from_user(values, context)`: checks what a user passes to `embed_<modality>` and
  turns it into what `prepare` takes, with one-line errors for wrong inputs;
- `random(data_config, max_len, vocab_size, batch_size, rng)`: random inputs of the
  right shape and dtype for benchmarks and tests.

A tower reads the modality it is named after (`config.model.image` reads "image").
The FLOPs of a tower belong to its encoder kind (`models/encoders.py`), not to the
modality: a ViT over a spectrogram counts like a ViT over an image.

A new modality is a module that subclasses `Modality` and registers an instance:
`MODALITIES.register("depth", DepthMaps())`; a data source must then provide it.
"""

import dataclasses

import numpy as np

from bigalign.data.tokenizer import Tokenizer
from bigalign.registry import Registry

MODALITIES = Registry("modality")


@dataclasses.dataclass(frozen=True)
class PrepareContext:
    """What host-side preparation needs besides the batch."""

    tokenizer: Tokenizer | None
    max_len: int
    data_config: object  # the config's `data` section


class Modality:
    """One kind of input; see the module docstring for what each method is for."""

    dtype = np.float32
    raw_key = ""  # the key of a decoded example that `prepare` reads ("caption" for text)

    def input_shape(self, data_config, max_len: int) -> tuple[int, ...]:
        raise NotImplementedError

    def prepare(self, values, context: PrepareContext) -> np.ndarray:
        return np.asarray(values, self.dtype)

    def from_user(self, values, context: PrepareContext):
        raise NotImplementedError

    def random(self, data_config, max_len: int, vocab_size: int, batch_size: int,
               rng: np.random.Generator) -> np.ndarray:
        shape = (batch_size, *self.input_shape(data_config, max_len))
        return rng.normal(size=shape).astype(self.dtype)


def get(name: str) -> Modality:
    return MODALITIES.get(name)


def random_batch(config, rng: np.random.Generator, *, vocab_size: int | None = None) -> dict:
    """A global batch (`config.batch_size`) of random inputs for every tower of `config`,
    for benchmarks and tests; `vocab_size` defaults to config.text.vocab_size."""
    from bigalign.models.towers import tower_names  # models never import modalities

    return {
        name: get(name).random(config.data, config.text.max_len,
                               vocab_size or config.text.vocab_size, config.batch_size, rng)
        for name in tower_names(config.model)
    }


# The built-in modalities register themselves on import.
from bigalign.modalities import audio, image, text  # noqa: E402,F401
