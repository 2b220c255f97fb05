"""The memory planner (bigalign/plan.py) against XLA's count of the compiled step, on the
8 simulated CPU devices of conftest.py; its batch search; its command line."""

import functools
import math
import os
import sys
from unittest import mock

import jax
import pytest

import bigalign
from bigalign import config as config_lib, objectives, plan
from bigalign.errors import UserError

DEVICES = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


def small_config(*, loss, batch, fsdp=1, chunks=1, depth=1, scan=False, remat="none",
                 audio=False, image_size=16, max_len=8):
    """Towers of width 64 (16 image tokens, 8 text, 64 audio) that compile in seconds,
    with activations and loss temporaries, not the train state, making most of the step."""
    config = config_lib.base_config()
    config.batch_size = batch
    config.mesh.fsdp = fsdp
    config.loss.name = loss
    config.grad_cache.num_chunks = chunks
    config.data.image_size = image_size
    config.text.max_len = max_len
    config.model.update(embed_dim=128, remat=remat, scan_layers=scan)
    names = ["image", "text"]
    if audio:
        config.model.audio = config_lib.tower_config("audio")
        config.loss.pairs = (("image", "text"), ("audio", "text"))
        names.append("audio")
    for name in names:
        config.model[name].update(width=64, depth=depth, num_heads=2, mlp_dim=256)
    return config


# name -> small_config settings. The comments give each part's share of the plan
# ("state": parameters, optimizer state and gradients), and planned / compiled as measured.
CONFIGS = {
    # activations 88%, loss temporaries 6%, state 6%; 1.04
    "2 towers, softmax, fsdp 1": dict(loss="softmax", batch=1024),
    # activations 87%, loss temporaries 5%, state 8%; 1.05
    "2 towers, softmax_tiled, fsdp 1, 2 blocks": dict(
        loss="softmax_tiled", batch=2048, depth=2, image_size=8, max_len=4),
    # activations 97%, loss temporaries 1%, state 2%; 1.06
    "3 towers, sigmoid, fsdp 8": dict(loss="sigmoid", batch=512, fsdp=8, audio=True),
    # activations 92% (one chunk's), state 6%; 1.01
    "2 towers, sigmoid_chunked, fsdp 8, GradCache 4, scan + remat full": dict(
        loss="sigmoid_chunked", batch=2048, fsdp=8, chunks=4, depth=2, scan=True, remat="full"),
    # loss temporaries 96% (GradCache's loss moment: [1024, 8192] logits' products), state 1%; 1.02
    "2 towers, sigmoid, fsdp 1, GradCache 2": dict(
        loss="sigmoid", batch=8192, chunks=2, image_size=8, max_len=4),
    # loss temporaries 97% ([512, 4096] logits' products), state 1%; 1.03
    "2 towers, softmax, fsdp 8, GradCache 2, scan + remat dots_no_batch": dict(
        loss="softmax", batch=4096, fsdp=8, chunks=2, depth=2, scan=True, remat="dots_no_batch",
        image_size=8, max_len=4),
}


@functools.cache
def compiled_total(name: str) -> int:
    return plan.compiled_memory(bigalign.build(small_config(**CONFIGS[name]))).total


@pytest.mark.parametrize("name", CONFIGS)
def test_the_plan_is_within_10_percent_of_the_compiled_step(name):
    config = small_config(**CONFIGS[name])
    memory = plan.plan(config, DEVICES)
    assert (memory.activations + memory.loss) / memory.total > 0.8  # not the state's share
    ratio = memory.total / compiled_total(name)
    assert 0.9 <= ratio <= 1.1, f"{name}: planned {memory} is {ratio:.3f} x XLA's"


def test_the_configs_cover_towers_meshes_losses_and_grad_cache():
    configs = [small_config(**settings) for settings in CONFIGS.values()]
    assert {len(c.loss.pairs) + 1 for c in configs} == {2, 3}
    assert {c.mesh.fsdp for c in configs} == {1, DEVICES}
    assert {c.loss.name for c in configs} == {"softmax", "softmax_tiled", "sigmoid", "sigmoid_chunked"}
    assert {c.grad_cache.num_chunks > 1 for c in configs} == {False, True}


def per_device(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("frozen", [False, True])
def test_the_parameters_and_optimizer_state_are_the_train_state_shard(frozen):
    config = small_config(loss="sigmoid", batch=64, fsdp=DEVICES, depth=2, scan=True)
    config.model.image.frozen = frozen  # LiT: no gradients, moments or activations
    state = bigalign.build(config).abstract_state()
    counted = plan.count(config, DEVICES)
    assert counted.parameters == per_device(state.params)
    assert counted.optimizer == per_device((state.opt_state, state.step, state.rng))
    trained = {name: tree for name, tree in state.params.items() if not (frozen and name == "image")}
    assert counted.trainable == per_device(trained)
    blocks = {name: per_device(state.params[name]["encoder"]["encoder"]["blocks"])
              for name in ("image", "text")}
    assert {name: shard for name, (shard, _) in counted.blocks.items()} == blocks
    assert [tower.trained for tower in counted.towers] == [not frozen, True]


@pytest.mark.parametrize("name", ["2 towers, softmax, fsdp 1", "3 towers, sigmoid, fsdp 8"])
def test_the_largest_batch_fits_and_the_next_multiple_does_not(name):
    config = small_config(**CONFIGS[name])
    memory = plan.plan(config, DEVICES).total
    multiple = DEVICES * config.grad_cache.num_chunks
    config.batch_size += multiple
    hbm_gib = (memory + plan.plan(config, DEVICES).total) / 2 / plan.GIB
    largest = plan.largest_batch(config, DEVICES, hbm_gib)
    assert largest == config.batch_size - multiple
    for batch, fits in ((largest, True), (largest + multiple, False)):
        config.batch_size = batch
        assert (plan.plan(config, DEVICES).total <= hbm_gib * plan.GIB) == fits
    # The compiled step at that batch (the config's own) fits the same memory.
    assert compiled_total(name) <= hbm_gib * plan.GIB
    assert plan.largest_batch(config, DEVICES, memory / plan.GIB / 100) == 0


def run_cli(*args) -> None:
    argv = ["bigalign.plan", *args]
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(sys.modules):
        sys.modules.pop("config_config", None)  # ml_collections reuses a loaded config module
        plan.main(argv)


def cli_error(*args) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(*args)
    return str(exit_.value.code)


def test_the_command_line_plans_every_loss_and_grad_cache_setting(capsys):
    run_cli("--config", DEMO, "--devices", "8", "--hbm_gib", "0.25", "--chunks", "1",
            "--chunks", "4", "--config.mesh.fsdp=2")
    lines = capsys.readouterr().out.splitlines()
    assert "8 devices (mesh data 4 x fsdp 2), global batch 128 (16 per device)" in lines[1]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "loss " not in line]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (loss, chunks) for loss in ("softmax", "softmax_tiled", "sigmoid", "sigmoid_chunked")
        for chunks in ("1", "4")]
    config = load_demo()
    config.mesh.fsdp, config.loss.name, config.grad_cache.num_chunks = 2, "sigmoid", 4
    assert rows[5][-1].strip() == f"{plan.largest_batch(config, 8, 0.25):,}"


def load_demo():
    sys.path.insert(0, os.path.dirname(DEMO))
    try:
        import demo
    finally:
        sys.path.pop(0)
    return demo.get_config()


def test_help_prints_usage_and_flags(capsys):
    """The error lines point to --helpfull, so it, and --help, must answer."""
    for asks in ("--help", "--helpfull"):
        with pytest.raises(SystemExit) as exit_:
            run_cli(asks)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("The memory planner") and "--hbm_gib" in out and "--devices" in out


def test_command_line_mistakes_are_one_line_errors(monkeypatch):
    monkeypatch.setitem(objectives.LOSSES._entries, "my_loss", objectives.LOSSES.get("sigmoid"))
    assert cli_error("--config", DEMO, "--devices", "6", "--hbm_gib", "1") == (
        "bigalign: error: batch_size=128 is not divisible by the 6 data shards; use a multiple of 6")
    assert cli_error("--config", DEMO, "--devices", "8", "--hbm_gib", "1",
                     "--config.mesh.data=16") == (
        "bigalign: error: mesh.data=16 x mesh.fsdp=1 does not fit the 8 devices; choose mesh.data "
        "x mesh.fsdp dividing the 8 devices (mesh.data=-1 takes all devices left after fsdp)")
    assert cli_error("--config", DEMO, "--devices", "8", "--hbm_gib", "0").startswith(
        "bigalign: error: flag --hbm_gib=0.0: --hbm_gib must be a positive number of GiB")
    assert cli_error("--config", DEMO, "--hbm_gib", "1") == (
        "bigalign: error: flag --devices=None: Flag --devices must have a value other than None. "
        "(see --helpfull)")
    assert cli_error("--config", DEMO, "--devices", "8", "--hbm_gib", "1", "--chunks", "0") == (
        "bigalign: error: flag --chunks=0: 0 is not a positive integer (see --helpfull)")
    assert cli_error("--devices", "8", "--hbm_gib", "1") == (
        "bigalign: error: --config is required, e.g. --config configs/demo.py")
    assert jax.device_count() == DEVICES  # the backend is up: --check can no longer add devices
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])  # restored after --check adds to it
    assert cli_error("--config", DEMO, "--devices", "16", "--hbm_gib", "1", "--check") == (
        "bigalign: error: --check compiles for --devices=16 devices, but this process already "
        "has 8; run it in a fresh process (python -m bigalign.plan ... --check)")
    config = load_demo()
    config.loss.name = "my_loss"
    with pytest.raises(UserError, match="loss.name='my_loss' is not a loss the planner"):
        plan.plan(config, 8)
