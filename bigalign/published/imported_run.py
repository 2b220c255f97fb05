"""A published model written as a bigalign workdir: config, tokenizer and step 0.

The workdir holds `config.json` (the architecture the importer read, ready to train),
a copy of the tokenizer file the checkpoint was trained with, and
`checkpoints/0` with the parameters only. `bigalign.load(WORKDIR)` embeds with it,
`model.<tower>.init_from=WORKDIR` locks or starts one tower from it (LiT),
`model.init_from=WORKDIR` starts a new run from all of it (fine-tuning), and training
in WORKDIR itself starts from it (step 0 is a starting point, with fresh optimizer
state).
"""

from collections.abc import Callable

import jax
import ml_collections

from bigalign import builder, checkpoint, config as config_lib, workdir as workdir_lib
from bigalign.data import tokenizer_kinds
from bigalign.errors import UserError


def write_run(config: ml_collections.ConfigDict, workdir: str,
              convert: Callable[[dict], dict], tokenizer_file: str = "") -> dict:
    """Writes the model of `config` with the parameters `convert(like)` gives (`like`:
    the model's parameter shapes) as a new workdir; returns those parameters."""
    directory = workdir_lib.make(workdir)
    if (directory / "checkpoints").exists() or (directory / config_lib.SAVED_CONFIG).exists():
        raise UserError(f"--workdir {workdir} already holds a run; give a new directory")
    config = ml_collections.ConfigDict(config.to_dict())
    if tokenizer_file:  # read first: a file of the wrong kind stops here
        tokenizer = tokenizer_kinds.load(config.text.tokenizer_kind, tokenizer_file)
        config.text.tokenizer = str(tokenizer_kinds.save_into(tokenizer, workdir))
    run = builder.build(config, workdir)
    like = run.abstract_state().params
    params = jax.device_put(convert(like), run.state_sharding.params)
    config_lib.save(run.config, workdir)
    checkpointer = checkpoint.Checkpointer(directory / "checkpoints")
    try:
        checkpointer.save_parameters(params)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return params
