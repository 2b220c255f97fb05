"""Config validation: every mistake is one line naming the key and the fix."""

import os
import subprocess
import sys
from unittest import mock

import ml_collections
import pytest
from absl import flags

import bigalign
from bigalign import config as config_lib, schema, train
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
        (lambda c: setattr(c.loss, "name", "infonce"), "loss.name='infonce' must be one of softmax, softmax_tiled, sigmoid, sigmoid_chunked (or register a new loss)"),
        (lambda c: setattr(c.data, "image_size", 30), "model.image.patch_size=4 does not divide the image input size (30, 30)"),
        (lambda c: setattr(c.mesh, "data", 16), "mesh.data=16 x mesh.fsdp=1 does not fit the 8 devices"),
        (lambda c: setattr(c.model.image, "patchsize", 8), "unknown config key 'model.image.patchsize'; did you mean 'patch_size'"),
        (lambda c: setattr(c.model.text, "patch_size", 8), "unknown config key 'model.text.patch_size'"),
        (lambda c: setattr(c.model.image, "variant", "B/15"), "model.image.patch_size=15 does not divide the image input size (32, 32)"),
        (lambda c: setattr(c.model.image, "variant", "Q/16"), "Q"),
        (lambda c: setattr(c.model, "remat", "some"), "model.remat='some' must be one of none, full"),
        (lambda c: setattr(c.model, "compute_dtype", "float16"), "model.compute_dtype='float16' must be one of float32, bfloat16"),
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
        (lambda c: setattr(c.data, "max_skipped_fraction", -0.1), "data.max_skipped_fraction=-0.1 must be a number in [0, 1]"),
        (lambda c: setattr(c, "batch_size", 0), "batch_size=0 must be an integer >= 1"),
        (lambda c: setattr(c.optimizer, "learning_rate", -1.0), "optimizer.learning_rate=-1.0 must be a number > 0"),
        (lambda c: setattr(c.data, "num_workers", -1), "data.num_workers=-1 must be an integer >= 0"),
        (lambda c: setattr(c.model.image, "width", 0), "model.image.width=0 must be an integer >= 1"),
        (lambda c: setattr(c.evals.retrieval, "recall_at", (1, 0)), "evals.retrieval.recall_at=(1, 0) must be a tuple whose items are each an integer >= 1"),
        (lambda c: setattr(c.evals.retrieval, "match", "same"), "evals.retrieval.match='same' must be one of"),
        (lambda c: setattr(c.evals.geometry, "every", -1), "evals.geometry.every=-1 must be an integer >= 0"),
        (lambda c: setattr(c.text, "tokenizer", "/no/such.model"), "text.tokenizer='/no/such.model' must be '' or the path of an existing file; create one with"),
        (lambda c: setattr(c.data, "class_names", "/"), "data.class_names='/' must be '' or the path of an existing file"),
        (lambda c: setattr(c.data, "tfds_data_dir", __file__), "data.tfds_data_dir="),
        (lambda c: setattr(c.model.image, "init_from", "/no/such/run"), "model.image.init_from='/no/such/run' must be '' or the path of an existing directory"),
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


def cli_error(*args) -> str:
    """The message the command line (bigalign.train) exits with, run in this process."""
    argv = ["bigalign.train", *args]
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    # ml_collections finds the --config.key overrides in sys.argv, and loads the config
    # file as module "config_config", reusing one left from an earlier load: start afresh.
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(sys.modules), \
            pytest.raises(SystemExit) as exit_:
        sys.modules.pop("config_config", None)
        train.parse_flags(argv, flag_values)
        train.main([], flag_values)
    return str(exit_.value.code)


DEMO = os.path.join(REPO, "configs/demo.py")


@pytest.mark.parametrize(
    "override, message",
    [("--config.batch_sise=64", "bigalign: error in a --config override: 'batch_sise' Did you mean \"batch_size\""),
     ("--config.batch_size=100", "batch_size=100 is not divisible by the 8 data shards"),
     ("--config.batch_size=0", "batch_size=0 must be an integer >= 1"),
     ("--config.batch_size=x", "flag --config.batch_size=x: invalid literal for int()"),
     ("--config.optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 must be a number > 0"),
     ("--config.data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
     ("--config.data.name=csv:/no/such/index.csv", "CSV index '/no/such/index.csv' does not exist"),
     ("--config.data.name=csv:/", "CSV index '/' is a directory; give the path of an index file"),
     ("--config.data.name=", "data.name='' must be a non-empty string"),
     ("--config.data.array=3", "--config override: the config has no key 'array' (valid keys: bigalign/config.py)"),
     ("--config.text.max_len=1", "text.max_len=1 must be an integer >= 2"),
     ("--config.data.name=array_record:/no/such/*.ar", "no ArrayRecord files match '/no/such/*.ar'"),
     ("--config.text.tokenizer=/no/such.model", "text.tokenizer='/no/such.model' must be '' or the path of an existing file"),
     ("--config.max_consecutive_nonfinite=0", "max_consecutive_nonfinite=0 must be an integer >= 1")],
)
def test_command_line_overrides_with_bad_values_are_one_line_errors(override, message, tmp_path):
    error = cli_error("--config", DEMO, "--workdir", str(tmp_path / "run"), override)
    assert message in error and "\n" not in error, error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_files_that_cannot_be_loaded_are_one_line_errors(tmp_path):
    def error_of(path):
        return cli_error("--config", str(path), "--workdir", str(tmp_path / "run"))

    assert error_of("configs/nope.py") == (
        "bigalign: error: config file 'configs/nope.py' does not exist; give a Python file "
        "with a get_config() function, e.g. --config configs/demo.py")
    assert "config file '" + str(tmp_path) + "' is a directory" in error_of(tmp_path)
    empty = tmp_path / "empty.py"
    empty.write_text("width = 3\n")
    assert error_of(empty) == f"bigalign: error: config file '{empty}' has no get_config() function"
    broken = tmp_path / "broken.py"
    broken.write_text("from bigalign.config import base_config\n\ndef get_config(:\n    pass\n")
    assert error_of(broken) == f"bigalign: error: config file '{broken}' line 3: invalid syntax"
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    sizes = {}\n    return sizes['width']\n")
    assert error_of(raising) == f"bigalign: error: config file '{raising}' line 3: KeyError: 'width'"
    # A ValueError, as a recipe's UserError: ml_collections wraps it with its traceback.
    refusing = tmp_path / "refusing.py"
    refusing.write_text("from bigalign.errors import UserError\n\ndef get_config(run=''):\n"
                        "    raise UserError(f'give the run, not {run!r}')\n")
    assert error_of(f"{refusing}:x") == (
        f"bigalign: error: config file '{refusing}' line 4: UserError: give the run, not 'x'")


def test_a_workdir_that_cannot_be_a_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    assert cli_error("--config", DEMO, "--workdir", str(tmp_path / "file")) == (
        f"bigalign: error: --workdir '{tmp_path / 'file'}' is a file, not a directory; give a "
        f"directory (a new one starts a run, an existing run's resumes it)")
    below_a_file = tmp_path / "file" / "run"
    assert cli_error("--config", DEMO, "--workdir", str(below_a_file)) == (
        f"bigalign: error: cannot create --workdir '{below_a_file}': Not a directory; give a "
        f"directory you can write")
    assert cli_error("--config", DEMO, "--workdir", "") == (
        "bigalign: error: --workdir is empty; give the directory for the run's checkpoints")


def test_the_command_line_prints_its_error_without_a_traceback(tmp_path):
    """The one property that needs a process: what absl's app.run leaves on stderr."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "bigalign.train", "--config", DEMO,
         "--workdir", str(tmp_path / "run"), "--config.batch_size=100"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "bigalign: error: batch_size=100 is not divisible by the 8 data shards; use a multiple of 8"]


def bad_value(rule, tmp_path):
    """A value `rule` must reject, chosen from the rule's declared bounds and kind."""
    if isinstance(rule, schema.Integer):
        return rule.low - 1 if rule.low is not None else (
            rule.high + 1 if rule.high is not None else 0.5)
    if isinstance(rule, schema.Number):
        for bound, bad in ((rule.low, lambda b: b - 0.5), (rule.above, lambda b: b),
                           (rule.below, lambda b: b), (rule.high, lambda b: b + 0.5)):
            if bound is not None:
                return bad(bound)
        return "not a number"
    if isinstance(rule, (schema.OneOf, schema.Registered)):
        return "no-such-choice"
    if isinstance(rule, schema.Text):
        return "" if rule.nonempty else 3
    if isinstance(rule, schema.Path):
        return str(tmp_path) if rule.kind == "file" else __file__
    if isinstance(rule, schema.Sequence):
        return (bad_value(rule.item, tmp_path),)
    assert isinstance(rule, schema.Like), rule
    return {bool: "yes", int: "1", float: "one", str: 3, tuple: "a,b"}[type(rule.default)]


def every_key(section, prefix=""):
    """(dotted key, rule) for every key of a schema section."""
    for key, entry in section.items():
        if isinstance(entry, dict):
            yield from every_key(entry, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", schema.rule_of(entry)


def test_every_key_of_the_schema_rejects_a_value_outside_its_rule(tmp_path):
    """Walks the whole schema, towers of every kind included, with one bad value at a time."""
    config = load_config("demo", "audio")  # vit, text and audio towers
    towers = {f"model.{name}.": config_lib.tower_schema(config.model[name].kind)
              for name in ("image", "text", "audio")}
    keys = [(k, r) for k, r in every_key(config_lib.schema()) if not k.startswith(tuple(towers))]
    keys += [(prefix + k, r) for prefix, tower in towers.items() for k, r in every_key(tower)]
    assert len(keys) > 90
    for dotted, rule in keys:
        changed = config.to_dict()
        *path, last = dotted.split(".")
        node = changed
        for part in path:
            node = node[part]
        node[last] = value = bad_value(rule, tmp_path)
        with pytest.raises(UserError) as error:
            config_lib.validate(ml_collections.ConfigDict(changed))
        message = str(error.value)
        assert message.startswith(f"{dotted}="), (dotted, value, message)
        assert "\n" not in message


def test_an_unimportable_extension_module_is_a_one_line_error():
    config = config_lib.base_config()
    config.imports = ("no_such_extension_module",)
    with pytest.raises(UserError, match="config.imports names 'no_such_extension_module', which "
                                        "cannot be imported .*put it on PYTHONPATH"):
        config_lib.validate(config)
