"""bigalign: large-batch multimodal contrastive pretraining in JAX/Flax.

    run = bigalign.build(config, workdir)   # everything a run needs (builder.py)
    model = bigalign.load(workdir)          # a trained model: embed_image, embed_text, ...
"""

from bigalign.api import Model, load
from bigalign.builder import Run, build

__all__ = ["Model", "Run", "build", "load"]
