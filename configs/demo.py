"""Demo: a tiny CLIP on the built-in shapes data; trains in about a minute on a 2-core CPU.

python -m bigalign.train --config configs/demo.py --workdir /tmp/bigalign-demo
python -m bigalign.train --config configs/demo.py:audio --workdir /tmp/bigalign-demo-audio

CLIP's softmax loss learns this small-batch demo faster than SigLIP's sigmoid
(same 600 steps: zero-shot 0.29 vs 0.24, recall@1 0.12 vs 0.06); switch with
--config.loss.name=sigmoid --config.model.init_logit_scale=2.3026.

`:audio` adds a third tower. Each example is then a picture, a caption and a sound
clip of the same scene (colour -> pitch, shape -> timbre, size -> loudness, place ->
onset). Image and audio are both bound to text, the anchor modality (as in
LanguageBind): the loss is the sum of the image-text and audio-text losses, and
evaluation reports zero-shot classification from text prompts for images and sounds.
"""

import math

from bigalign.config import base_config, tower_config


def get_config(towers: str = ""):
    config = base_config()
    config.batch_size = 128
    config.total_steps = 600
    config.log_every = 50
    config.checkpoint_every = 200
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 60
    config.loss.name = "softmax"
    config.model.init_logit_scale = math.log(1 / 0.07)  # CLIP's initial temperature
    # Watch it learn (tools/plot_metrics.py): zero-shot, retrieval and the embedding
    # geometry every 50 steps, linear probes every 200.
    for name in ("zeroshot", "retrieval", "geometry"):
        config.evals[name].every = 50
    config.evals.linear_probe.every = 200
    if towers == "audio":
        config.model.audio = tower_config("audio")
        config.loss.pairs = (("image", "text"), ("audio", "text"))
    elif towers:
        raise ValueError(f"configs/demo.py:{towers}: the only option is ':audio'")
    return config
