"""CLIP ViT-B/16 recipe (Radford et al., 2021), trained as open_clip trains it.

python -m bigalign.train --config configs/clip_b16.py --workdir gs://bucket/clip_b16 \
    --config.data.name=array_record:/data/pairs/train-*.array_record

Image: ViT-B/16 at 224 px pooled at a class token (86M); text: a 12-layer, 512-wide,
8-head causal Transformer over 77 tokens of a 49,408-token BPE vocabulary, pooled at
the end-of-text token (63M); 512-wide shared space; softmax (InfoNCE) loss over a 32k
global batch, computed block by block (`softmax_tiled`: the same value without the
global logit matrix on one device).

Hyperparameters and where they come from:
- CLIP paper (arXiv 2103.00020), its appendix tables of hyperparameters: batch 32,768,
  vocabulary 49,408, weight decay 0.2, 2,000 warmup iterations, Adam beta1 0.9,
  beta2 0.98 and epsilon 1e-6 for the ViTs, temperature initialised at 0.07, 32 epochs
  (over its 400M pairs: 390,625 steps at 32k), learning rate 5e-4 for ViT-B/16,
  cosine decay, embedding dimension 512.
- open_clip (open_clip_train/params.py get_default_params: lr 5e-4, beta2 0.98,
  eps 1e-6 for ViT models, citing the paper; open_clip_train/main.py): torch's AdamW,
  whose decay is scaled by the current learning rate (weight_decay_mode="optax"), on
  every parameter but gains, biases and the logit scale (weight_decay_mask=
  "all_but_gains_and_biases"); cosine_lr after a linear warmup; no gradient clipping
  unless --grad-clip-norm is given (grad_clip_norm=0).

OpenAI's towers, as open_clip builds them (open_clip/model.py, transformer.py and
model_configs/ViT-B-16.json): QuickGELU (OpenAI's checkpoints; open_clip's own ViT-B-16
config uses exact GELU), LayerNorm epsilon 1e-5 (torch's), a LayerNorm before the
image Transformer (ln_pre), no bias in the patch embedding, CLIP's per-channel pixel
mean/std, projections without bias, and the logit scale clamped at 100 (the paper's
"temperature ... clipped to prevent scaling the logits by more than 100").

Tokens: 77 per text from a 49,408-entry vocabulary. CLIP's own byte-level BPE, from
the merges file open_clip ships:
    --config.text.tokenizer_kind=clip --config.text.tokenizer=/path/bpe_simple_vocab_16e6.txt.gz
(python -c 'import open_clip.tokenizer as t; print(t.default_bpe())' prints its path.)
Without them a sentencepiece model of that size is trained on the data's captions.
"""

import math

from bigalign.config import base_config

PAIRS_SEEN = 32 * 400_000_000  # 32 epochs over CLIP's 400M pairs
BATCH_SIZE = 32768


def get_config():
    config = base_config()
    config.batch_size = BATCH_SIZE
    config.total_steps = PAIRS_SEEN // BATCH_SIZE
    config.log_every = 100
    config.checkpoint_every = 2000
    config.optimizer.update(
        learning_rate=5e-4, warmup_steps=2000, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
        weight_decay_mode="optax", weight_decay_mask="all_but_gains_and_biases",
        grad_clip_norm=0.0,
    )
    config.mesh.fsdp = 8
    config.data.update(
        name="array_record:/data/pairs/train-*.array_record",
        zeroshot_name="tfds:cifar100",
        image_size=224,
        num_workers=16,  # per host; see docs/benchmarks.md (input pipeline)
        num_eval=10_000,
    )
    config.text.update(max_len=77, vocab_size=49_408)
    config.model.update(
        embed_dim=512,
        init_logit_scale=math.log(1 / 0.07),
        max_logit_scale=100.0,
        compute_dtype="bfloat16",
        remat="dots_no_batch",
        scan_layers=True,
    )
    openai = dict(activation="quick_gelu", layer_norm_epsilon=1e-5)
    config.model.image.update(variant="B/16", pool="cls", ln_pre=True, patch_bias=False,
                              pixel_norm="clip", **openai)
    # Causal, pooled at the end-of-text token (open_clip's argmax pooling).
    config.model.text.update(width=512, depth=12, num_heads=8, mlp_dim=2048, pool="last",
                             causal=True, **openai)
    config.loss.name = "softmax_tiled"
    config.eval.batch_size = 1024
    return config
