"""SigLIP ViT-B/16 recipe for TPU pods and GPU clusters (Zhai et al., 2023).

python -m bigalign.train --config configs/siglip_b16.py --workdir gs://bucket/run \
    --config.mesh.fsdp=8

Image: ViT-B/16 at 224 px with attention pooling (86M); text: a B-sized causal
Transformer, 64 tokens, 32k vocabulary; 768-wide shared space; sigmoid loss over a
32k global batch with the chunked (ring) variant, so no device holds the global
logit matrix. bf16 compute with float32 master weights, parameters and optimizer
state split over `mesh.fsdp` devices, and block-level rematerialisation.

LiT (locked image tower): add
    --config.model.image.init_from=/path/to/image_run --config.model.image.frozen=True

Data: image-text pairs in ArrayRecord shards (`tools/make_array_record.py` makes
them from a CSV index or WebDataset tars); zero-shot on CIFAR-100 from tfds
(`tfds build cifar100 --file_format=array_record` once). Point them elsewhere with
    --config.data.name=array_record:/data/pairs/train-*.array_record
    --config.data.eval_name=csv:/data/pairs/val.csv
"""

import math

from bigalign.config import base_config


def get_config():
    config = base_config()
    config.batch_size = 32768
    config.total_steps = 100_000
    config.log_every = 100
    config.checkpoint_every = 2000
    config.optimizer.update(learning_rate=1e-3, warmup_steps=5000, weight_decay=1e-4)
    config.mesh.fsdp = 8
    config.data.update(
        name="array_record:/data/pairs/train-*.array_record",
        zeroshot_name="tfds:cifar100",
        image_size=224,
        num_workers=16,  # per host; see docs/benchmarks.md (input pipeline)
        num_eval=10_000,
    )
    config.text.update(max_len=64, vocab_size=32_000)
    config.model.update(
        embed_dim=768,
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
        compute_dtype="bfloat16",
        remat="dots_no_batch",
        scan_layers=True,
    )
    config.model.image.update(variant="B/16", pool="map")
    config.model.text.update(variant="B", pool="last")
    config.loss.name = "sigmoid_chunked"
    config.eval.batch_size = 1024
    return config
