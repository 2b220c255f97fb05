"""LiT: a locked, pre-trained image tower and a text tower trained to match it
(Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning").

python tools/import_open_clip.py --model ViT-B-16 --weights open_clip_model.safetensors \
    --workdir /runs/clip_b16_imported
python -m bigalign.train --config configs/lit.py:/runs/clip_b16_imported --workdir /runs/lit \
    --config.data.name=csv:/data/pairs/train.csv

The argument is a bigalign workdir holding the image tower (an imported checkpoint or
any earlier run): its image tower config, embedding width and image size are copied
from the config saved there, so the tower's shapes match its checkpoint, and it is
loaded (`model.image.init_from`) and frozen (`model.image.frozen`: no gradient and no
optimizer state).

Hyperparameters from big_vision's LiT config (big_vision/configs/proj/image_text/
lit_coco.py, google-research/big_vision before commit 3b8e5ab renamed it, which
retrains the released LiT-B16B on coco_captions): batch 4096, 5000 steps, Adam
(optax.scale_by_adam: beta2 0.999), learning rate 1e-3, `wd` 0.01 in big_vision's
convention (decoupled, times the schedule's multiplier only: weight_decay_mode=
"big_vision", on kernels only), cosine decay after a warmup of max(3% of the steps,
100), gradient clipping at norm 1.0, the logit scale initialised at 10, 16 tokens per
text, the softmax contrastive loss, 224 px. Its text tower is a BERT-Base initialised
from BERT; here it is a bidirectional B-sized Transformer pooled at its first token
(BERT's [CLS]) trained from scratch, with a biased head into the shared space.
"""

import math

from bigalign import config as config_lib

TOTAL_STEPS = 5000


def get_config(image_run: str = ""):
    source = config_lib.load_source_run(image_run, "configs/lit.py",
                                        "the run whose image tower it locks")
    config = config_lib.base_config()
    config.batch_size = 4096
    config.total_steps = TOTAL_STEPS
    config.optimizer.update(
        learning_rate=1e-3, warmup_steps=max(int(0.03 * TOTAL_STEPS), 100), b2=0.999,
        weight_decay=0.01, weight_decay_mode="big_vision", weight_decay_mask="kernels",
        grad_clip_norm=1.0,
    )
    config.data.update(name="csv:/data/pairs/train.csv", image_size=source.data.image_size)
    config.text.update(max_len=16, vocab_size=32_000)
    config.model.update(embed_dim=source.model.embed_dim, init_logit_scale=math.log(10.0))
    config.model.image.update(source.model.image)
    config.model.image.update(init_from=image_run, frozen=True)
    config.model.text.update(variant="B", causal=False, pool="first", projection_bias=True)
    config.loss.name = "softmax"
    return config
