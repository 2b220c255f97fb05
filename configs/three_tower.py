"""Image, text and audio towers in one space, text as the anchor: the SigLIP B/16 recipe
(configs/siglip_b16.py) with a third, audio tower.

python -m bigalign.train --config configs/three_tower.py --workdir gs://bucket/three_tower \
    --config.data.name=csv:/data/triples/train.csv --config.mesh.fsdp=8

Each CSV row holds an image path (`filepath`), a caption (`caption`) and a WAV path
(`audio`) of the same scene (bigalign/data/csv_source.py). The loss is the sum of the
image-text and audio-text sigmoid losses: image and audio are each bound to text, as
in LanguageBind, and never contrasted with each other directly.

The audio tower reads the clip as AST does (Gong et al. 2021, "AST: Audio Spectrogram
Transformer"): 16 kHz audio, 128 mel bins from 25 ms windows (400 samples) every 10 ms
(160 samples), 1024 frames (10.24 s; 10.255 s of samples make exactly 1024 windows),
16x16 patches into a ViT-B, pooled at a class token. AST's patches overlap (stride
10); bigalign's do not. Optimizer, batch, schedule and the image and text towers are
SigLIP B/16's (see configs/siglip_b16.py for their sources); audio-caption sets are far
smaller than WebLI, so set --config.total_steps for yours.
"""

import importlib.util
import os

from bigalign.config import tower_config


def _sibling_config(name: str):
    """get_config() of configs/<name>.py, this file's neighbour."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _sibling_config("siglip_b16")
    config.data.update(name="csv:/data/triples/train.csv", csv_audio_column="audio")
    config.data.audio.update(sample_rate=16_000, clip_seconds=10.255, num_mel_bins=128,
                             frame_length=400, hop_length=160)
    config.model.audio = tower_config("audio", variant="B/16", pool="cls")
    config.loss.pairs = (("image", "text"), ("audio", "text"))
    return config
