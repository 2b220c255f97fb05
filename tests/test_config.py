"""Config validation: every mistake is one line naming the key and the fix."""

import os
import subprocess
import sys

import pytest

from bigalign import config as config_lib
from bigalign.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_and_demo_configs_are_valid():
    config_lib.validate(config_lib.base_config())
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    config_lib.validate(demo.get_config())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.model, "embed_dimm", 3), "unknown config key 'model.embed_dimm'; did you mean 'embed_dim'"),
        (lambda c: setattr(c, "batch_size", 12), "batch_size=12 is not divisible by the 8 data shards"),
        (lambda c: setattr(c.model.text, "num_heads", 3), "model.text.width=64 is not divisible by num_heads=3"),
        (lambda c: setattr(c.loss, "name", "infonce"), "unknown loss.name 'infonce'"),
        (lambda c: setattr(c.data, "image_size", 30), "data.image_size=30 is not divisible by model.image.patch_size=4"),
        (lambda c: setattr(c.mesh, "data", 3), "mesh.data=3 does not fit the 8 available devices"),
        (lambda c: setattr(c.optimizer, "warmup_steps", 10**6), "optimizer.warmup_steps=1000000 must lie in"),
    ],
)
def test_validation_errors_name_the_key(change, message):
    config = config_lib.base_config()
    change(config)
    with pytest.raises(UserError) as error:
        config_lib.validate(config)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def run_cli(*args, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run(
        [sys.executable, "-m", "bigalign.train", "--config", os.path.join(REPO, "configs/demo.py"),
         "--workdir", str(tmp_path / "run"), *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )


@pytest.mark.parametrize(
    "override, message",
    [("--config.batch_sise=64", "batch_sise"), ("--config.batch_size=100", "not divisible by the 8 data shards")],
)
def test_command_line_errors_are_one_line_without_traceback(override, message, tmp_path):
    result = run_cli(override, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
