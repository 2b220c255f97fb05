"""Audio: a clip of `data.audio.clip_seconds` as a standardised log-mel spectrogram
float32 [frames, mels] (`data/audio.py`), computed on the host per batch.

Spectrograms are standardised with fixed constants, (x - LOG_MEL_MEAN) / LOG_MEL_STD,
so training and evaluation see the same values whatever the batch.
"""

import numpy as np

from bigalign.data import audio, sources, waveforms
from bigalign.errors import UserError
from bigalign.modalities import MODALITIES, Modality

# Mean and standard deviation of the shapes sounds' log-mel values at the default audio
# config (-11.70 and 1.94 over 4000 training clips, before augmentation), rounded.
LOG_MEL_MEAN = -11.7
LOG_MEL_STD = 1.9


def spectrogram_options(data_config) -> dict:
    """Keyword arguments of `audio.log_mel_spectrogram` for the configured audio."""
    options = {
        key: int(data_config.audio[key])
        for key in ("sample_rate", "num_mel_bins", "frame_length", "hop_length")
    }
    if min(options.values()) <= 0:
        raise UserError(f"data.audio values must be positive; got {options}")
    return options


def normalise(clips: np.ndarray, options: dict) -> np.ndarray:
    """float32 waveforms [b, S] -> standardised log-mel float32 [b, frames, mels]."""
    log_mel = audio.log_mel_spectrogram(clips, **options)
    return (log_mel - np.float32(LOG_MEL_MEAN)) * np.float32(1 / LOG_MEL_STD)


class Audio(Modality):
    raw_key = "audio"

    def input_shape(self, data_config, max_len):
        options = spectrogram_options(data_config)
        frames = audio.num_frames(
            sources.clip_samples(data_config), options["frame_length"], options["hop_length"]
        )
        if frames == 0:
            raise UserError(
                f"data.audio.clip_seconds={data_config.audio.clip_seconds} is shorter than one "
                f"frame of data.audio.frame_length={options['frame_length']} samples"
            )
        return (frames, options["num_mel_bins"])

    def prepare(self, values, context):
        return normalise(values, spectrogram_options(context.data_config))

    def from_user(self, values, context):
        """Mono waveforms at data.audio.sample_rate: a list of 1-D arrays or [N, S]; each is
        cut to its first clip_seconds (shorter ones are padded with silence)."""
        if isinstance(values, np.ndarray) and values.ndim == 1:
            raise UserError("embed_audio takes a batch of waveforms; got one: wrap it in [...]")
        clips = [np.asarray(value, np.float32) for value in values]
        if not clips:
            raise UserError("no waveforms to embed: pass at least one")
        if any(clip.ndim != 1 for clip in clips):
            raise UserError(f"each waveform must be 1-D (mono samples); got shapes "
                            f"{[clip.shape for clip in clips][:3]}")
        length = sources.clip_samples(context.data_config)
        return np.stack([waveforms.clip(clip, length, None) for clip in clips])


MODALITIES.register("audio", Audio())
