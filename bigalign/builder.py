"""The run builder: one function that turns a config into everything a run needs.

    run = bigalign.build(config, workdir)   # validated config, mesh, tokenizer, model, ...
    state = run.init_state()                 # or restored from a checkpoint
    state, metrics = run.train_step(state, run.global_batch(host_batch))
    embeddings = run.embedder("image")(state.params, pixels)

The training loop (`train.py`), the evaluation, `bigalign.load`, the benchmarks in
`tools/` and the tests all build through here, so the sequence config -> mesh ->
tokenizer -> model -> optimizer -> state layout -> compiled step exists once.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from bigalign import checkpoint, distributed, flops, sharding, step
from bigalign import workdir as workdir_lib
from bigalign import modalities as modalities_lib
from bigalign import config as config_lib
from bigalign.data import pipeline, tokenizer as tokenizer_lib, tokenizer_kinds
from bigalign.models import towers
from bigalign.optimizer import make_optimizer


def load_tokenizer(config, workdir: str | None):
    """`text.tokenizer` of `text.tokenizer_kind` (tokenizer_kinds.py), else for the
    "sentencepiece" kind WORKDIR/tokenizer.model (trained on the data's captions on
    first use, by process 0 while the others wait); None without either (random
    inputs: config.text.vocab_size ids)."""
    if config.text.tokenizer or config.text.tokenizer_kind != "sentencepiece":
        return tokenizer_kinds.load(config.text.tokenizer_kind, config.text.tokenizer)
    if workdir is None:
        return None
    model_path = workdir_lib.path(workdir) / "tokenizer.model"
    tokenizer = None
    if distributed.is_writer():
        tokenizer = tokenizer_lib.load_or_train(
            model_path, lambda: pipeline.tokenizer_corpus(config.data), config.text.vocab_size)
    distributed.barrier("tokenizer")
    return tokenizer if tokenizer is not None else tokenizer_lib.Tokenizer.load(model_path)


def step_flops(config, vocab_size: int) -> int:
    """Model FLOPs of one train step (forward + backward, 2 per multiply-add; see flops.py)."""
    resolved = towers.resolve_towers(config.model, vocab_size=vocab_size, max_len=config.text.max_len)
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    forward = {
        name: flops.tower_forward_flops(tower, shapes[name], config.model.embed_dim)
        for name, tower in resolved.items()
    }
    return flops.train_step_flops(
        forward, step.frozen_towers(config), config.batch_size, config.model.embed_dim,
        len(config.loss.pairs),
    )


def make_initializer(config, vocab_size: int):
    """(model, optimizer, init) of a validated config: `init()` makes a boxed TrainState.

    No devices are needed: `build` lays the state out on the mesh, the memory planner
    (plan.py) counts its shapes.
    """
    model = towers.build_model(config.model, vocab_size=vocab_size, max_len=config.text.max_len)
    optimizer = make_optimizer(config)
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    example = {
        name: jnp.ones((1, *shapes[name]), modalities_lib.get(name).dtype)
        for name in towers.tower_names(config.model)
    }
    return model, optimizer, step.initializer(config, model, optimizer, example)


@dataclasses.dataclass
class Run:
    """A built run: what `build` made, and the operations on it."""

    config: ml_collections.ConfigDict
    workdir: str | None
    mesh: Mesh
    tokenizer: tokenizer_lib.Tokenizer | None
    vocab_size: int
    model: towers.ContrastiveModel
    optimizer: optax.GradientTransformation
    state_sharding: Any  # the layout of the train state on the mesh
    train_step: Callable  # jitted (state, global batch) -> (state, metrics); donates state
    flops_per_step: int
    init: Callable  # () -> a boxed TrainState (logical axis names on its leaves)
    _embedders: dict = dataclasses.field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        """The towers, each named after the modality it reads."""
        return towers.tower_names(self.config.model)

    def init_state(self) -> step.TrainState:
        """Fresh parameters and optimizer state, laid out by `state_sharding`."""
        return step.create_state(self.init, self.state_sharding)

    def abstract_state(self) -> step.TrainState:
        """The train state's shapes, dtypes and shardings, without allocating it."""
        shapes = jax.eval_shape(lambda: nn.unbox(self.init()))
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes, self.state_sharding)

    def global_batch(self, host_batch: dict) -> dict:
        """This process's numpy batch -> global jax.Arrays split over data x fsdp."""
        return sharding.global_batch(host_batch, self.mesh)

    def random_batch(self, rng: np.random.Generator) -> dict:
        """A host batch of random inputs of the config's shapes (benchmarks, tests)."""
        return modalities_lib.random_batch(self.config, rng, vocab_size=self.vocab_size)

    def embedder(self, modality: str) -> Callable:
        """fn(params, inputs [n, ...]) -> L2-normalised embeddings, numpy [n, E].

        Data-parallel over the mesh: `inputs` (numpy, the same on every process) is split
        over the batch axes, each process embedding its devices' rows, and the result is
        gathered onto every process. Compiled once per input shape.
        """
        if modality not in self._embedders:
            model, mesh = self.model, self.mesh
            embed = jax.jit(
                lambda params, x: model.apply({"params": params}, {modality: x})["embeddings"][modality],
                out_shardings=sharding.replicated(mesh),
            )

            def embed_numpy(params, inputs):
                inputs = np.asarray(inputs)
                padded = sharding.pad_rows(inputs, sharding.batch_devices(mesh))
                return np.asarray(embed(params, sharding.shard_rows(padded, mesh)))[: len(inputs)]

            self._embedders[modality] = embed_numpy
        return self._embedders[modality]

    def embedders(self, params) -> dict:
        """{modality: fn(inputs [n, ...]) -> embeddings [n, E]} with `params` bound: what the
        evaluators and `bigalign.load`'s model embed with."""
        return {m: (lambda x, m=m: self.embedder(m)(params, x)) for m in self.modalities}

    def prepare_context(self) -> modalities_lib.PrepareContext:
        return modalities_lib.PrepareContext(self.tokenizer, self.config.text.max_len, self.config.data)

    def train_data(self, start_batch: int = 0):
        """The endless, checkpointable stream of this process's training batches, from
        global batch `start_batch` on."""
        config = self.config
        return pipeline.train_dataset(
            config.data, self.tokenizer, max_len=config.text.max_len,
            global_batch_size=config.batch_size, seed=config.seed, modalities=self.modalities,
            start_batch=start_batch,
        )

    def load_initial_params(self, state: step.TrainState, start_from: str = "") -> step.TrainState:
        """A new run's parameters: all of them from `start_from` (a workdir whose step 0 is
        an imported model) or `model.init_from` (fine-tuning), then each tower that has
        `model.<tower>.init_from` from that run (LiT)."""
        params = dict(state.params)
        source = start_from or self.config.model.init_from
        if source:
            key = "--workdir" if start_from else "model.init_from"
            params = checkpoint.load_initial_params(source, params, key=key)
            distributed.say(f"Initialised all parameters from {source}")
        for name in self.modalities:
            source = self.config.model[name].init_from
            if source:
                key = f"model.{name}.init_from"
                params[name] = checkpoint.load_initial_params(source, {name: params[name]}, key=key)[name]
                distributed.say(f"Initialised tower {name!r} from {source}")
        return state.replace(params=params)

    def describe(self, params) -> str:
        """Parameters, devices, mesh and FLOPs, then one line per tower."""
        config = self.config
        count = sum(x.size for x in jax.tree.leaves(params))
        lines = [f"{count / 1e6:.2f}M parameters, {jax.device_count()} devices, "
                 f"mesh {dict(self.mesh.shape)}, {self.flops_per_step / 1e12:.4g} TFLOPs per train step"]
        resolved = towers.resolve_towers(config.model, vocab_size=self.vocab_size,
                                         max_len=config.text.max_len)
        for name, tower in resolved.items():
            count = sum(x.size for x in jax.tree.leaves(params[name]))
            variant = config.model[name].variant or "custom"
            locked = ", frozen" if config.model[name].frozen else ""
            lines.append(f"  {name:<6} {tower['kind']:<5} {variant:<10} width {tower['width']:>4}, "
                         f"depth {tower['depth']:>2}: {count / 1e6:8.2f}M parameters{locked}")
        return "\n".join(lines)


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> Run:
    """Validates `config` and builds its run on this machine's devices.

    With a `workdir`, the tokenizer is WORKDIR/tokenizer.model (trained on first use)
    unless `text.tokenizer` names one; without, text towers use config.text.vocab_size.
    """
    config_lib.validate(config)
    tokenizer = load_tokenizer(config, workdir)
    vocab_size = tokenizer.vocab_size if tokenizer else config.text.vocab_size
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_on_mesh(config, mesh.size)
    model, optimizer, init = make_initializer(config, vocab_size)
    state_sharding = step.state_shardings(init, mesh)
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        model=model,
        optimizer=optimizer,
        state_sharding=state_sharding,
        train_step=step.make_train_step(config, model, optimizer, mesh, state_sharding),
        flops_per_step=step_flops(config, vocab_size),
        init=init,
    )
