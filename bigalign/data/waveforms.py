"""Sound files in: WAV decoding, band-limited resampling, and fixed-length clips.

WAV (PCM, 8/16/24/32-bit integer, any channel count) is read with the standard
library, mixed to mono and scaled to [-1, 1]. A file at another sample rate is
resampled by zero-padding or truncating its spectrum (np.fft.rfft / irfft):
exact for band-limited signals and free of the aliasing linear interpolation
adds when lowering the rate. Clips are then cut to the model's length: a random
window in training, the first window in evaluation; short files are zero-padded.
"""

import io
import os
import wave

import numpy as np

from bigalign.data.skipping import UnreadableExample


class AudioError(UnreadableExample):
    """A sound that cannot be read: missing file, not a PCM WAV, truncated."""


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 [S] at from_rate -> float32 [round(S * to_rate / from_rate)] at to_rate."""
    if from_rate == to_rate:
        return waveform
    length = max(1, round(len(waveform) * to_rate / from_rate))
    spectrum = np.fft.rfft(waveform.astype(np.float64))
    bins = length // 2 + 1
    spectrum = spectrum[:bins] if bins <= len(spectrum) else np.pad(spectrum, (0, bins - len(spectrum)))
    return (np.fft.irfft(spectrum, n=length) * (length / len(waveform))).astype(np.float32)


def _pcm_to_float(frames: bytes, sample_width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM -> float32 mono in [-1, 1]."""
    if sample_width == 1:  # 8-bit WAV is unsigned
        samples = np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0
    elif sample_width == 3:  # 24-bit: widen to int32 through the top three bytes
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        padded = np.zeros((len(raw), 4), np.uint8)
        padded[:, 1:] = raw
        samples = padded.view("<i4").reshape(-1).astype(np.float32) / 256.0
    else:
        samples = np.frombuffer(frames, f"<i{sample_width}").astype(np.float32)
    scale = float(2 ** (8 * sample_width - 1))
    return (samples.reshape(-1, channels).mean(axis=1) / scale).astype(np.float32)


def load(sound, sample_rate: int) -> np.ndarray:
    """A mono float32 waveform at `sample_rate` from a WAV path or bytes, or a float array as is."""
    if isinstance(sound, np.ndarray):
        return sound.astype(np.float32)
    try:
        with wave.open(io.BytesIO(sound) if isinstance(sound, bytes) else os.fspath(sound)) as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            frames = f.readframes(f.getnframes())
    except FileNotFoundError:
        raise AudioError("missing file") from None
    except (wave.Error, EOFError, OSError) as error:
        raise AudioError(f"unreadable sound ({type(error).__name__}: {error})") from None
    if width not in (1, 2, 3, 4) or len(frames) < width * channels:
        raise AudioError(f"unreadable sound ({8 * width}-bit PCM with {len(frames)} bytes)")
    frames = frames[: len(frames) - len(frames) % (width * channels)]  # a truncated last frame
    return resample(_pcm_to_float(frames, width, channels), rate, sample_rate)


def clip(waveform: np.ndarray, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """`length` samples: a random window (with `rng`) or the first one; zero-padded if short."""
    if len(waveform) < length:
        return np.pad(waveform, (0, length - len(waveform)))
    start = int(rng.integers(len(waveform) - length + 1)) if rng is not None else 0
    return waveform[start : start + length]
