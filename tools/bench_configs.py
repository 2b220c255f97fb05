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


def clip_ti_config() -> ml_collections.ConfigDict:
    """The two-tower CLIP that tools/bench_vs_openclip.py builds in both frameworks: a
    ViT-Ti/16 at 112 px with a class token, a 6-layer Ti-width causal text tower over
    CLIP's 49408-token vocabulary and 77-token context, 512-d embeddings, batch 64,
    softmax loss, AdamW."""
    config = base_config()
    config.batch_size = 64
    config.data.image_size = 112
    config.text.update(max_len=77, vocab_size=49408)
    config.model.embed_dim = 512
    config.model.image.update(variant="Ti/16", pool="cls")
    config.model.text.update(width=192, depth=6, num_heads=3, mlp_dim=768)
    config.loss.name = "softmax"
    return config


def get_config(name: str) -> ml_collections.ConfigDict:
    """`--config tools/bench_configs.py:clip_ti` for tools/bench_step.py."""
    configs = {"clip_ti": clip_ti_config}
    if name not in configs:
        raise ValueError(f"tools/bench_configs.py:{name}: known configs are {sorted(configs)}")
    return configs[name]()
