"""Demo: a tiny SigLIP on the built-in shapes data; trains in a few minutes on a CPU.

python -m bigalign.train --config configs/demo.py --workdir /tmp/bigalign-demo
"""

from bigalign.config import base_config


def get_config():
    config = base_config()
    config.batch_size = 128
    config.total_steps = 600
    config.log_every = 50
    config.checkpoint_every = 200
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 60
    return config
