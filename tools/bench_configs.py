"""Configs shared by the benchmarks in tools/ (they run as `python tools/X.py`, so this
folder is on sys.path and they `import bench_configs`)."""

import ml_collections

from bigalign.config import base_config


def sized_config(variant: str, *, batch_size: int, image_size: int, max_len: int,
                 vocab_size: int, embed_dim: int) -> ml_collections.ConfigDict:
    """base_config with an image tower of a named size ("B/16") and a text tower of the
    same size ("B"), for benchmarks and scaling experiments on random inputs."""
    config = base_config()
    config.batch_size = batch_size
    config.data.image_size = image_size
    config.text.update(max_len=max_len, vocab_size=vocab_size)
    config.model.embed_dim = embed_dim
    config.model.image.variant = variant
    config.model.text.variant = variant.partition("/")[0]
    return config
