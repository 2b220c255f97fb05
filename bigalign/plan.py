"""The memory planner: bytes per device of a train step, and the largest batch that fits.

    python -m bigalign.plan --config configs/siglip_b16.py --devices 256 --hbm_gib 16
    python -m bigalign.plan --config configs/demo.py --devices 8 --hbm_gib 0.5 --check

Why: the global batch, the mesh, the loss variant and GradCache are chosen before a pod
is rented, so the memory one device needs must come without one, for many settings at
once. What: `plan(config, devices)` is an analytic model of what one device holds at
the step's peak; `largest_batch` searches it for the largest global batch that fits;
the command prints both for every loss variant and GradCache setting. XLA's count of
the compiled step (`compiled_memory`, lowered on abstract inputs: nothing is
allocated) checks the model (`--check`, tests/test_plan.py, tools/plan_memory.py).

The model, per device: b examples (c per GradCache chunk); a tower has T tokens, width
W, MLP width M, H heads, L blocks, a compute dtype.
- Parameters and optimizer state: the train state's own shapes (jax.eval_shape of its
  initialiser), each array split over fsdp where sharding.LOGICAL_AXIS_RULES splits
  it; a scanned tower's loop holds one more copy of its stacked blocks.
- Activations: each block of a trained tower keeps KEPT_PER_BLOCK buffers for its
  backward pass; a rematerialised block being differentiated holds the rest of an
  unrolled block's; each tower keeps STEM_BUFFERS more, and uint8 pixels a float32 copy.
- Loss temporaries: every tower's [b, E] embeddings and their cotangents; softmax and
  sigmoid gather [B, E] and hold LOGIT_BLOCKS [b, B] blocks, the ring variants
  RING_TILES [b, tile] tiles and RING_BLOCKS [b, E] blocks (losses.py); one pair's.
- Gradients: float32 like the trainable parameters; one block's (a scanned tower's
  stacked blocks') during the towers' backward pass, plus GradCache's running sum.
- The peak is the largest of three moments: the loss's backward pass (kept activations
  and the loss; with GradCache over all b examples, without activations), the towers'
  (kept activations, the recomputed block, gradients), and the update (the gradients
  and the new moments optax.apply_if_finite's lax.cond returns; without scan under
  fsdp also the blocks' gathered weights and unreduced gradients).

The counts are read off XLA's buffer assignment of compiled steps (XLA:CPU, float32);
docs/scaling.md compares the two. XLA:CPU computes bfloat16 matmuls in float32 and
drops remat's barriers in unscanned towers: there it keeps more than a TPU or GPU,
which the model follows (bf16 at 2 bytes, remat as its policy says).
"""

import dataclasses
import math
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np

from bigalign import builder, config as config_lib, losses, modalities, sharding, step, train
from bigalign.data import pipeline
from bigalign.errors import UserError
from bigalign.metrics import markdown_table
from bigalign.models import encoders, towers

MIB, GIB = 2**20, 2**30
FLOAT32 = 4

# Buffers a block keeps for its backward pass: (c x T x W and c x T x M in the compute
# dtype, c x H x T x T float32 attention weights), by model.remat.
KEPT_PER_BLOCK = {
    # Unrolled, XLA keeps the block's input, query, key and value with the head-major
    # copies the attention matmuls read, the attention output (both layouts), the two
    # residual sums, the MLP output and buffers of the recomputed LayerNorms; fc1's
    # output and GELU's (recomputed from fc1's: transformer.EncoderBlock); three
    # attention-sized float32 buffers: the logits and weights, and one more since
    # attention is heads-major (measured: +2.03 MiB compiled, +2.16 planned, in the
    # 3-tower test config).
    "none": (13, 2, 3),
    "dots": (6, 1, 1),  # every matmul's output: q, k, v, scores, AV, out, fc1, fc2 (unmeasured)
    "dots_no_batch": (5, 1, 0),  # the projections' outputs: q, k, v, out, fc1, fc2
    "full": (1, 0, 0),  # the block's input
}
# What a rematerialised block holds while it is differentiated: an unrolled block's
# buffers with the LayerNorms' and GELU's outputs, which a block under a remat policy
# does not recompute a second time (transformer.Encoder).
DIFFERENTIATED_BLOCK = (13, 3, 3)
# lax.scan without remat keeps each primitive's linearisation residuals instead, stacked
# over the blocks (measured by the depth's, the MLP width's and the heads' effect on the
# compiled step of tests/test_plan.py's two towers).
SCANNED_WITHOUT_REMAT = (9, 3, 2)
STEM_BUFFERS = 5  # c x T x W per tower outside its blocks
MAP_BUFFERS = 4  # c x T x W more for attention pooling: its keys and values, both layouts
# [b, B] blocks: the tiles' products kept for the loss's VJP and XLA's copies of them
# (measured: its loop's stacked outputs; softmax also a transposed layout).
LOGIT_BLOCKS = {"softmax": 1.75, "sigmoid": 1.25}
RING_TILES, RING_BLOCKS = 3, 3  # [b, tile] and [b, E] in the ring variants' loops
UPDATE_COPIES = 3  # the gradients and the two new moments, float32 like the parameters


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes one device holds at the step's peak, by what holds them."""

    parameters: int  # the parameter shard, and a scanned tower's loop copy of its blocks
    optimizer: int  # AdamW's moments and counters
    gradients: int  # float32 gradients (and, at the update, the new moments)
    activations: int  # kept for the backward pass, for one GradCache chunk
    loss: int  # logits, gathered embeddings, ring tiles and blocks, embeddings
    inputs: int  # the batch shard

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class Tower:
    """One tower's dimensions, from `towers.resolve_towers` and its encoder kind."""

    name: str
    trained: bool  # not frozen: it has gradients and keeps activations
    tokens: int  # per example, as the Transformer sees them (encoder kind's count)
    width: int
    mlp_dim: int
    heads: int
    depth: int
    dtype_bytes: int  # the compute dtype's
    remat: str
    scan: bool
    stem_buffers: int  # c x T x W buffers outside the blocks
    input_bytes: int  # one example's input
    pixel_copy: int  # bytes of one example's uint8 pixels scaled to float32, else 0

    def buffers(self, counts: tuple, rows: int) -> int:
        """Bytes of (width, mlp, attention) buffer counts for `rows` examples."""
        width, mlp, attention = counts
        tokens = rows * self.tokens
        return (tokens * (width * self.width + mlp * self.mlp_dim) * self.dtype_bytes
                + attention * tokens * self.heads * self.tokens * FLOAT32)

    def kept(self, rows: int) -> int:
        """What the tower keeps for its backward pass."""
        per_block = SCANNED_WITHOUT_REMAT if self.scan and self.remat == "none" else (
            KEPT_PER_BLOCK[self.remat])
        return (self.depth * self.buffers(per_block, rows)
                + self.buffers((self.stem_buffers, 0, 0), rows) + rows * self.pixel_copy)

    def recomputed(self, rows: int) -> int:
        """What a rematerialised block adds while it is differentiated: the rest of
        DIFFERENTIATED_BLOCK's buffers."""
        if self.remat == "none" or not self.depth:
            return 0
        rest = tuple(a - b for a, b in zip(DIFFERENTIATED_BLOCK, KEPT_PER_BLOCK[self.remat]))
        return self.buffers(rest, rows)


@dataclasses.dataclass(frozen=True)
class Counted:
    """What the model needs of a config apart from its batch, loss and GradCache: the
    train state's bytes per device and the towers."""

    parameters: int
    optimizer: int  # moments and counters
    trainable: int  # the parameters that get (float32) gradients
    blocks: dict  # tower -> (its blocks' parameter bytes per device, the same unsplit)
    towers: list


def _is_block(path) -> bool:
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return any(name == "blocks" or re.fullmatch(r"block\d+", name) for name in names)


def count(config, fsdp: int) -> Counted:
    """The train state's bytes per device, from its shapes (jax.eval_shape of its
    initialiser) and logical axis names, and the towers' dimensions."""
    tokenizer = builder.load_tokenizer(config, None)
    vocab_size = tokenizer.vocab_size if tokenizer else config.text.vocab_size
    _, _, init = builder.make_initializer(config, vocab_size)
    boxed = jax.eval_shape(init)

    def splits(spec) -> int:
        axes = nn.logical_to_mesh_axes(tuple(spec), sharding.LOGICAL_AXIS_RULES) if spec else ()
        named = [a for axis in axes if axis for a in ((axis,) if isinstance(axis, str) else axis)]
        return fsdp ** named.count(sharding.FSDP_AXIS)

    whole = jax.tree.map(lambda a: a.size * a.dtype.itemsize, nn.unbox(boxed))
    shard = jax.tree.map(lambda n, spec: n // splits(spec), whole, nn.get_partition_spec(boxed))

    def blocks(tree) -> int:
        return sum(n for path, n in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_block(path))

    frozen = step.frozen_towers(config)
    trainable, _ = step.split_frozen(shard.params, frozen)
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    resolved = towers.resolve_towers(config.model, vocab_size=vocab_size, max_len=config.text.max_len)
    tower_list = []
    for name, tower in resolved.items():
        _, tokens = encoders.get(tower["kind"]).embedding_flops(tower, shapes[name])
        dtype = np.dtype(modalities.get(name).dtype)
        elements = math.prod(shapes[name])
        tower_list.append(Tower(
            name, name not in frozen, tokens, tower["width"], tower["mlp_dim"], tower["num_heads"],
            tower["depth"], np.dtype(tower["dtype"]).itemsize, tower["remat"], tower["scan_layers"],
            STEM_BUFFERS + MAP_BUFFERS * (tower["pool"] == "map"), elements * dtype.itemsize,
            elements * FLOAT32 if dtype == np.uint8 else 0))
    return Counted(
        parameters=sum(jax.tree.leaves(shard.params)),
        optimizer=sum(jax.tree.leaves((shard.opt_state, shard.step, shard.rng))),
        trainable=sum(jax.tree.leaves(trainable)),
        blocks={name: (blocks(shard.params[name]), blocks(whole.params[name])) for name in resolved},
        towers=tower_list,
    )


def _loss_bytes(config, per_device: int, batch: int) -> int:
    """The loss temporaries of one pair, and every tower's embeddings and cotangents."""
    embed, name = config.model.embed_dim, config.loss.name
    embeddings = 2 * len(towers.tower_names(config.model)) * per_device * embed * FLOAT32
    if name in LOGIT_BLOCKS:
        return embeddings + int((LOGIT_BLOCKS[name] * per_device + embed) * batch * FLOAT32)
    if name in losses.NAMES:  # a ring variant
        tile = losses.pick_tile(per_device, None)
        return embeddings + (RING_TILES * tile + RING_BLOCKS * embed) * per_device * FLOAT32
    raise UserError(f"loss.name={name!r} is not a loss the planner models; plan with one of "
                    f"{', '.join(losses.NAMES)}")


def _update_gradients(counted: Counted, fsdp: int) -> int:
    """The update's float32 buffers: the gradients and the new moments. Without scan under
    fsdp, a tower's blocks hold their unreduced gradients and gathered weights instead."""
    total = UPDATE_COPIES * counted.trainable
    for tower in counted.towers:
        if tower.trained and fsdp > 1 and not tower.scan:
            shard, whole = counted.blocks[tower.name]
            total += whole + whole * tower.dtype_bytes // FLOAT32 - UPDATE_COPIES * shard
    return total


def _memory(config, devices: int, counted: Counted, batch: int) -> Memory:
    """The model for `config` at global batch `batch` (see the module docstring)."""
    data, fsdp = sharding.mesh_shape(config.mesh, devices)
    per_device = batch // (data * fsdp)
    chunks = config.grad_cache.num_chunks
    rows = per_device // chunks
    trained = [tower for tower in counted.towers if tower.trained]
    kept = sum(tower.kept(rows) for tower in trained)
    recomputed = max((tower.recomputed(rows) for tower in trained), default=0)
    block_grads = max((counted.blocks[tower.name][0] // (1 if tower.scan else max(tower.depth, 1))
                       for tower in trained), default=0)
    held = dict(
        parameters=counted.parameters + sum(counted.blocks[t.name][0] for t in counted.towers if t.scan),
        optimizer=counted.optimizer,
        inputs=per_device * sum(tower.input_bytes for tower in counted.towers))
    loss = _loss_bytes(config, per_device, batch)
    moments = [  # the loss's backward pass, then the towers', then the update
        Memory(**held, gradients=0, activations=kept if chunks == 1 else 0, loss=loss),
        Memory(**held, gradients=block_grads + (counted.trainable if chunks > 1 else 0),
               activations=kept + recomputed, loss=0),
        Memory(**held, gradients=_update_gradients(counted, fsdp), activations=0, loss=0)]
    return max(moments, key=lambda memory: memory.total)


def _mesh(config, devices: int) -> tuple[int, int]:
    """(data, fsdp) of a validated config on `devices`, its batch and chunks checked."""
    config_lib.validate(config)
    data, fsdp = sharding.mesh_shape(config.mesh, devices)
    config_lib.validate_on_mesh(config, data * fsdp)
    return data, fsdp


def plan(config, devices: int, counted: Counted | None = None) -> Memory:
    """The analytic memory per device of `config`'s train step on `devices` devices.

    Raises UserError for a config, mesh or batch that does not fit them. `counted` (from
    `count`) saves counting the model again for another batch, loss or GradCache setting.
    """
    _, fsdp = _mesh(config, devices)
    return _memory(config, devices, counted or count(config, fsdp), config.batch_size)


def largest_batch(config, devices: int, hbm_gib: float, counted: Counted | None = None) -> int:
    """The largest global batch, a multiple of data x fsdp x grad_cache.num_chunks, whose
    plan fits in `hbm_gib` GiB per device; 0 when not even the smallest does.

    Bisects the model (no compilation): the batch returned fits and the next multiple
    does not.
    """
    config_lib.validate(config)
    data, fsdp = sharding.mesh_shape(config.mesh, devices)
    counted = counted or count(config, fsdp)
    multiple = data * fsdp * config.grad_cache.num_chunks

    def fits(k: int) -> bool:
        return _memory(config, devices, counted, k * multiple).total <= hbm_gib * GIB

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * multiple


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of the compiled step, bytes per device."""

    arguments: int  # the train state's shard and the batch shard
    outputs: int
    aliased: int  # outputs written over donated arguments (the train state)
    temporaries: int  # activations, gradients, gathered weights, logits, ...

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compiled_memory(run) -> CompiledMemory:
    """XLA's count for `run.train_step`, lowered on the state's and the batch's shapes and
    layouts (nothing is allocated) and compiled for this process's devices."""
    config = run.config
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    batch = {name: jax.ShapeDtypeStruct((config.batch_size, *shapes[name]), modalities.get(name).dtype,
                                        sharding=sharding.batch_sharding(run.mesh))
             for name in run.modalities}
    memory = run.train_step.lower(run.abstract_state(), batch).compile().memory_analysis()
    return CompiledMemory(memory.argument_size_in_bytes, memory.output_size_in_bytes,
                          memory.alias_size_in_bytes, memory.temp_size_in_bytes)


def report(config, devices: int, hbm_gib: float, chunk_counts=(1, 2, 4, 8), check=False) -> str:
    """The plan of every loss variant x GradCache setting as a markdown table, with the
    largest global batch of each in `hbm_gib` GiB; with `check`, XLA's count beside it
    (compiled for this process's devices, which must number at least `devices`)."""
    data, fsdp = _mesh(config, devices)
    counted = count(config, fsdp)
    per_device = config.batch_size // (data * fsdp)
    plans = []  # (loss, chunks, Memory or None where the chunks do not divide b, compiled, largest)
    for loss in losses.NAMES:
        for chunks in chunk_counts:
            variant = config.copy_and_resolve_references()
            variant.loss.name, variant.grad_cache.num_chunks = loss, chunks
            memory = compiled = None
            if per_device % chunks == 0:
                memory = _memory(variant, devices, counted, config.batch_size)
                compiled = compiled_memory(builder.build(variant)).total if check else None
            plans.append((loss, chunks, memory, compiled,
                          largest_batch(variant, devices, hbm_gib, counted)))
    unit, size = ("GiB", GIB) if any(m and m.total >= GIB for _, _, m, _, _ in plans) else ("MiB", MIB)
    rows = []
    for loss, chunks, memory, compiled, largest in plans:
        cells = ["-"] * (7 + 2 * check)
        if memory:
            cells = [f"{part / size:.2f}" for part in (*dataclasses.astuple(memory), memory.total)]
            if check:
                cells += [f"{compiled / size:.2f}", f"{memory.total / compiled:.2f}"]
        rows.append([loss, str(chunks), *cells, f"{largest:,}"])
    header = ["loss", "GradCache chunks", "parameters", "optimizer", "gradients", "activations",
              "loss temporaries", "inputs", "total"]
    header += ["compiled", "planned / compiled"] * check + [f"largest batch in {hbm_gib:g} GiB"]
    lines = [f"{devices} devices (mesh data {data} x fsdp {fsdp}), global batch "
             f"{config.batch_size:,} ({per_device:,} per device); {unit} per device at the step's "
             f"peak (bigalign/plan.py); the largest batch is a multiple of {data * fsdp} x chunks;"
             f" -: the chunks do not divide the per-device batch."]
    if check:
        lines.append(f"compiled: XLA's memory analysis of the step on {devices} simulated CPU "
                     f"devices (arguments + outputs - aliased + temporaries).")
        if config.model.compute_dtype != "float32":
            lines.append("XLA:CPU computes bfloat16 matmuls in float32: its count overstates "
                         "what a TPU or GPU keeps.")
    return "\n".join([*lines, "", markdown_table(header, rows)])


def simulate_devices(devices: int) -> None:
    """Makes this process's CPU backend `devices` devices (for --check), as
    tools/plan_memory.py does; possible only before jax first uses its backend."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if jax.device_count() < devices:
        raise UserError(f"--check compiles for --devices={devices} devices, but this process "
                        f"already has {jax.device_count()}; run it in a fresh process "
                        f"(python -m bigalign.plan ... --check)")


def define_flags(flag_values) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                    flag_values=flag_values, lock_config=True)
    flags.DEFINE_integer("devices", None, "Devices of the run (mesh.data x mesh.fsdp; "
                         "mesh.data=-1 takes all left after fsdp).", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB (a TPU v5e: 16, an H100: 80).",
                       flag_values=flag_values)
    flags.DEFINE_multi_integer("chunks", [1, 2, 4, 8], "GradCache settings to plan "
                               "(grad_cache.num_chunks; 1: off).", lower_bound=1,
                               flag_values=flag_values)
    flags.DEFINE_bool("check", False, "Compile each step on --devices simulated CPU devices "
                      "and print XLA's count beside the plan.", flag_values=flag_values)
    flags.mark_flags_as_required(["devices", "hbm_gib"], flag_values=flag_values)
    flags.register_validator("hbm_gib", lambda gib: gib is None or gib > 0,
                             "--hbm_gib must be a positive number of GiB", flag_values=flag_values)


def main(argv=None) -> None:
    """The command line; a mistake ends it with one line."""
    from absl import flags

    argv = sys.argv if argv is None else argv
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    if train.asks_for_help(argv):
        train.exit_with_help(flag_values, __doc__)
    train.parse_flags(argv, flag_values)
    if flag_values.config is None:
        sys.exit("bigalign: error: --config is required, e.g. --config configs/demo.py")
    try:
        if flag_values.check:
            simulate_devices(flag_values.devices)
        print("$ python -m bigalign.plan " + " ".join(argv[1:]))
        print(report(flag_values.config, flag_values.devices, flag_values.hbm_gib,
                     flag_values.chunks, flag_values.check), flush=True)
    except UserError as error:
        sys.exit(f"bigalign: error: {error}")


if __name__ == "__main__":
    main()
