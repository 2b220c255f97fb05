"""Config validation: every mistake is one line naming the key and the fix."""

import os
import subprocess
import sys

import pytest

import bigalign
from bigalign import config as config_lib
from bigalign.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, *args):
    """configs/<name>.py's get_config(*args)."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        module = __import__(name)
    finally:
        sys.path.pop(0)
    return module.get_config(*args)


def test_shipped_configs_are_valid():
    config_lib.validate(config_lib.base_config())
    config_lib.validate(load_config("demo"))
    three_towers = load_config("demo", "audio")
    config_lib.validate(three_towers)
    assert sorted(three_towers.model.audio.keys()) == sorted(config_lib.tower_config("audio").keys())
    config_lib.validate(load_config("siglip_b16"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.model, "embed_dimm", 3), "unknown config key 'model.embed_dimm'; did you mean 'embed_dim'"),
        (lambda c: setattr(c, "batch_size", 12), "batch_size=12 is not divisible by the 8 data shards"),
        (lambda c: setattr(c.model.text, "num_heads", 3), "model.text.width=64 is not divisible by num_heads=3"),
        (lambda c: setattr(c.loss, "name", "infonce"), "loss.name='infonce' is unknown; valid: softmax, softmax_tiled, sigmoid, sigmoid_chunked"),
        (lambda c: setattr(c.data, "image_size", 30), "model.image.patch_size=4 does not divide the image input size (30, 30)"),
        (lambda c: setattr(c.mesh, "data", 16), "mesh.data=16 x mesh.fsdp=1 does not fit the 8 devices"),
        (lambda c: setattr(c.model.image, "patchsize", 8), "unknown config key 'model.image.patchsize'; did you mean 'patch_size'"),
        (lambda c: setattr(c.model.text, "patch_size", 8), "unknown config key 'model.text.patch_size'"),
        (lambda c: setattr(c.model.image, "variant", "B/15"), "model.image.patch_size=15 does not divide the image input size (32, 32)"),
        (lambda c: setattr(c.model.image, "variant", "Q/16"), "Q"),
        (lambda c: setattr(c.model, "remat", "some"), "model.remat='some' is unknown; valid: none, full"),
        (lambda c: setattr(c.model, "compute_dtype", "float16"), "model.compute_dtype='float16' is unknown"),
        (lambda c: setattr(c.model.image, "kind", "cnn"), "model.image.kind='cnn' is unknown; valid: vit, text, audio"),
        (lambda c: setattr(c.model, "video", config_lib.tower_config("vit")), "model.video is a tower, but the data has no 'video' inputs"),
        (lambda c: setattr(c.model, "audio", config_lib.tower_config("audio")), "tower(s) ['audio'] appear in no loss.pairs entry"),
        (lambda c: setattr(c.loss, "pairs", (("image", "image"),)), "loss.pairs has ('image', 'image')"),
        (lambda c: setattr(c.loss, "pairs", (("image", "txt"),)), "each pair must name two different towers of ['image', 'text']"),
        (lambda c: setattr(c.optimizer, "warmup_steps", 10**6), "optimizer.warmup_steps=1000000 must lie in"),
        (lambda c: setattr(c.data, "name", "coco"), "unknown data source 'coco'; use 'shapes', 'tfds:NAME'"),
        (lambda c: setattr(c.data, "zeroshot_name", "tfds"), "unknown data source 'tfds'"),
        (lambda c: setattr(c.data, "crop_scale", (0.5, 1.5)), "data.crop_scale=(0.5, 1.5) must be (low, high)"),
        (lambda c: setattr(c.data, "crop_ratio", (2.0, 1.0)), "data.crop_ratio=(2.0, 1.0) must be"),
        (lambda c: setattr(c.data, "max_skipped_fraction", -0.1), "data.max_skipped_fraction=-0.1 must be in [0, 1]"),
        (lambda c: setattr(c.data, "prompts", ("a photo",)), "data.prompts entry 'a photo' must contain '{}'"),
    ],
)
def test_validation_errors_name_the_key(change, message):
    config = config_lib.base_config()
    change(config)
    with pytest.raises(UserError) as error:
        bigalign.build(config)  # validation, then the checks against the devices
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
    [("--config.batch_sise=64", "batch_sise"), ("--config.batch_size=100", "not divisible by the 8 data shards"),
     ("--config.data.name=csv:/no/such/index.csv", "CSV index '/no/such/index.csv' does not exist"),
     ("--config.data.name=array_record:/no/such/*.ar", "no ArrayRecord files match '/no/such/*.ar'"),
     ("--config.text.tokenizer=/no/such.model", "tokenizer model '/no/such.model' does not exist"),
     ("--config.max_consecutive_nonfinite=0", "max_consecutive_nonfinite=0 must be at least 1")],
)
def test_command_line_errors_are_one_line_without_traceback(override, message, tmp_path):
    result = run_cli(override, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unimportable_extension_module_is_a_one_line_error():
    config = config_lib.base_config()
    config.imports = ("no_such_extension_module",)
    with pytest.raises(UserError, match="config.imports names 'no_such_extension_module', which "
                                        "cannot be imported .*put it on PYTHONPATH"):
        config_lib.validate(config)
