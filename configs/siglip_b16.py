"""SigLIP ViT-B/16 recipe for TPU pods and GPU clusters (Zhai et al., 2023).

python -m bigalign.train --config configs/siglip_b16.py --workdir gs://bucket/run \
    --config.mesh.fsdp=8

Image: ViT-B/16 at 224 px with attention pooling (93M: 86M and the MAP head);
text: a B-sized bidirectional Transformer (big_vision's), 64 tokens, 32k vocabulary
(110M); 768-wide shared space; sigmoid loss over a 32k global batch with the chunked
(ring) variant, so no device holds the global logit matrix. bf16 compute with float32
master weights, parameters and optimizer state split over `mesh.fsdp` devices, and
block-level rematerialisation.

Hyperparameters and where they come from:
- SigLIP paper (Zhai et al. 2023, arXiv 2303.15343): the sigmoid loss with t' = log 10
  and b = -10 at initialisation, batch 32k, Adam with beta2 = 0.95 (lowered from 0.999
  to stabilise large-batch training), learning rate 1e-3, weight decay 1e-4.
- big_vision/optax.py (google-research/big_vision), the code SigLIP was trained with:
  `wd` is decoupled and multiplied by the schedule's multiplier only, not by the base
  learning rate (optimizer.weight_decay_mode="big_vision"; with optax's convention the
  same 1e-4 at lr 1e-3 would decay 1000x less), on parameters named `kernel` only
  (its default wd_mults; weight_decay_mask="kernels"); `grad_clip_norm` 1.0 as in
  big_vision/configs/proj/image_text/siglip_lit_coco.py; cosine decay to 0 after a
  linear warmup (big_vision/utils.py create_learning_rate_schedule).
- SigLIP 2 paper (Tschannen et al. 2025, arXiv 2502.14786, section 2): batch 32k, a
  cosine schedule with 20k warmup steps, 40B examples seen (1.22M steps at 32k);
  shorten with --config.total_steps (and warmup_steps) for smaller budgets.

Tokens: a 32k sentencepiece model trained on the data's captions; SigLIP's own
(big_vision's c4_en vocabulary, with its sticky-EOS conventions) with
    --config.text.tokenizer_kind=siglip --config.text.tokenizer=/path/sentencepiece.model

LiT (locked image tower): configs/lit.py. Fine-tuning a released SigLIP on a CSV
dataset: configs/siglip_finetune_csv.py.

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
    config.total_steps = 40_000_000_000 // 32768  # 40B examples (SigLIP 2)
    config.log_every = 100
    config.checkpoint_every = 2000
    config.optimizer.update(
        learning_rate=1e-3, warmup_steps=20_000, b2=0.95, weight_decay=1e-4,
        weight_decay_mode="big_vision", weight_decay_mask="kernels", grad_clip_norm=1.0,
    )
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
    # The released SigLIPs' image tower has no head (out_dim=(None, 768), big_vision's
    # SigLIP_demo.ipynb): the attention pooling's output is the embedding.
    config.model.image.update(variant="B/16", pool="map", projection="none")
    # big_vision's text tower (models/proj/image_text/text_transformer.py): bidirectional,
    # no padding mask, pooled at the final position ("last" there), a head with a bias.
    config.model.text.update(variant="B", causal=False, mask_padding=False, pool="final",
                             projection_bias=True)
    config.loss.name = "sigmoid_chunked"
    config.eval.batch_size = 1024
    return config
