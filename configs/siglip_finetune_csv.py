"""Fine-tune a released SigLIP on image-text pairs listed in a CSV file.

python tools/import_big_vision.py --weights webli_en_b16_224_63724782.npz --variant B/16 \
    --workdir /runs/siglip_b16_imported
python -m bigalign.train --config configs/siglip_finetune_csv.py:/runs/siglip_b16_imported \
    --workdir /runs/siglip_finetuned \
    --config.data.name=csv:/data/train.csv --config.data.eval_name=csv:/data/val.csv

The argument is the workdir of the imported model (or of any bigalign SigLIP run): the
model section (both towers, the shared width) and the text section (tokenizer, its
vocabulary and text length) are copied from the config saved there, the image size
too, and every parameter, the logit scale and bias among them, starts from its
checkpoint (`model.init_from`). The CSV has a `filepath` and a `caption` column
(bigalign/data/csv_source.py; other names with data.csv_image_column and
data.csv_text_column).

Where the settings come from:
- big_vision's SigLIP fine-tuning example (big_vision/configs/proj/image_text/
  siglip_lit_coco.py, "Minimal SigLIP example", which tunes on coco_captions from
  pre-trained towers): 5000 steps at batch 512, the sigmoid loss, Adam
  (optax.scale_by_adam's beta2 0.999), cosine decay after a warmup of max(3% of the
  steps, 100), gradient clipping at norm 1.0, decay in big_vision's convention
  (weight_decay_mode="big_vision", kernels only).
- bigalign's choices for tuning both towers (that example locks the image tower and
  trains its text tower at 1e-3): learning rate 1e-4, ten times lower, since both
  towers start trained; no weight decay, which would pull the released weights
  towards zero rather than towards where they started.
"""

from bigalign import config as config_lib

TOTAL_STEPS = 5000


def get_config(siglip_run: str = ""):
    source = config_lib.load_source_run(siglip_run, "configs/siglip_finetune_csv.py",
                                        "the SigLIP run to fine-tune")
    config = config_lib.base_config()
    config.batch_size = 512
    config.total_steps = TOTAL_STEPS
    config.checkpoint_every = 1000
    config.optimizer.update(
        learning_rate=1e-4, warmup_steps=max(int(0.03 * TOTAL_STEPS), 100), b2=0.999,
        weight_decay=0.0, weight_decay_mode="big_vision", weight_decay_mask="kernels",
        grad_clip_norm=1.0,
    )
    config.data.update(name="csv:/data/train.csv", image_size=source.data.image_size)
    config.text.update(source.text)
    config.model.update(source.model)
    config.model.init_from = siglip_run
    for tower in ("image", "text"):  # both train, from the checkpoint's values
        config.model[tower].update(init_from="", frozen=False)
    config.loss.name = "sigmoid"
    return config
