"""Tower kinds: the registry of encoders a tower can use (`model.<tower>.kind`).

Each kind registers an `EncoderKind` from its own module (`vit.py`, `text.py`,
`audio.py`): the Flax module, the config keys it adds to a tower's (with defaults),
its poolings and its FLOPs. An encoder maps a batch of inputs to an `EncoderOutput`:
the pooled features [B, width] that the tower projects into the shared embedding
space, and the token sequence before pooling [B, T, width] (for losses or decoders
that attend to tokens, such as a captioning head).

A new kind is a module with an `nn.Module` of that contract and one registration:

    ENCODERS.register("conv", EncoderKind(ConvNet, options=dict(pool="gap"),
                                          poolings=("gap",), embedding_flops=conv_flops))

after which `config.model.image = config.tower_config("conv")` uses it.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax

from bigalign.models.transformer import ACTIVATIONS
from bigalign.registry import Registry
from bigalign.schema import Integer, Key, Number, OneOf, Path

ENCODERS = Registry("tower kind")

# Keys every tower config has, whatever its kind (schema.py: defaults and constraints);
# the first five become encoder arguments.
SHARED_OPTIONS = dict(
    width=Key(64, Integer(low=1)),
    depth=Key(2, Integer(low=0)),  # 0: no blocks (an encoder without layers)
    num_heads=Key(2, Integer(low=1)),
    mlp_dim=Key(256, Integer(low=1)),
    pool="",  # set by the kind's options; its valid values are the kind's poolings
    # The map to the shared space: "linear", or "none" (the pooled features are the
    # embedding: big_vision's SigLIP image tower; width must equal model.embed_dim).
    projection=Key("linear", OneOf(("linear", "none"))),
    projection_bias=False,  # a bias in the linear projection (SigLIP's text head)
    variant="",  # a named size ("B/16", "So400m/14"; text: "B"): sets the sizes above
    frozen=False,  # LiT: no gradient and no optimizer state for this tower
    # A bigalign workdir (or checkpoint step dir) to load this tower from.
    init_from=Key("", Path("directory")),
)
ENCODER_ARGUMENTS = ("width", "depth", "num_heads", "mlp_dim", "pool")

# Options of the kinds built on transformer.Encoder (vit, text, audio), for their
# `options`: the MLP's nonlinearity ("gelu_tanh": flax, big_vision; "gelu": open_clip;
# "quick_gelu": OpenAI's CLIPs) and the LayerNorm epsilon (torch's is 1e-5).
TRANSFORMER_OPTIONS = dict(
    activation=Key("gelu_tanh", OneOf(tuple(ACTIVATIONS))),
    layer_norm_epsilon=Key(1e-6, Number(above=0)),
)


class EncoderOutput(NamedTuple):
    pooled: jax.Array  # [B, width]
    tokens: jax.Array  # [B, T, width]: the sequence before pooling


@dataclasses.dataclass(frozen=True)
class EncoderKind:
    """One tower kind.

    module: the encoder's Flax module class; it takes the encoder arguments (the
      shared ones, `options`, `context` and the model-wide dropout_rate, dtype, remat,
      scan_layers) and maps inputs to an `EncoderOutput`.
    options: config keys of this kind beyond SHARED_OPTIONS, with their defaults (or
      `schema.Key`s: a default and its constraint); all become encoder arguments.
    poolings: the valid values of `pool`.
    embedding_flops: (resolved tower, one example's input shape) -> (multiply-adds of
      turning the input into tokens, number of tokens the Transformer sees); see flops.py.
    context: arguments the run supplies rather than the config ("vocab_size", "max_len").
    """

    module: type
    options: dict
    poolings: tuple[str, ...]
    embedding_flops: Callable[[dict, tuple], tuple[int, int]]
    context: tuple[str, ...] = ()


def get(kind: str, key: str = "") -> EncoderKind:
    return ENCODERS.get(kind, key)
