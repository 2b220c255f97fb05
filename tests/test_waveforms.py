"""Tests for bigalign.data.waveforms: WAV decoding, resampling without aliasing, clips."""

import io
import wave

import numpy as np
import pytest

from bigalign.data import waveforms
from helpers import random_seed


def wav_bytes(samples: np.ndarray, rate: int, width: int = 2) -> bytes:
    """float samples [S] or [S, C] in [-1, 1] -> a PCM WAV of `width` bytes per sample."""
    samples = samples.reshape(len(samples), -1)
    scale = 2 ** (8 * width - 1) - 1
    ints = np.round(samples * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.reshape(-1))
    else:
        raw = ints.astype(f"<i{width}").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(samples.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return buffer.getvalue()


def tone(hz: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * hz * t)


def peak_hz(waveform: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform))
    return float(np.argmax(spectrum) * rate / len(waveform))


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_and_channels_decode_to_the_mono_mix(width):
    rng = np.random.default_rng(random_seed())
    stereo = rng.uniform(-0.9, 0.9, size=(int(rng.integers(50, 500)), 2))
    loaded = waveforms.load(wav_bytes(stereo, 8000, width), 8000)
    assert loaded.dtype == np.float32 and loaded.shape == (len(stereo),)
    quantum = 2.0 / 2 ** (8 * width - 1)
    np.testing.assert_allclose(loaded, stereo.mean(axis=1), atol=max(quantum, 1e-6))  # float32


def test_resampling_keeps_pitch_length_and_level(tmp_path):
    hz = float(np.random.uniform(200, 1500))
    path = tmp_path / "tone.wav"
    path.write_bytes(wav_bytes(tone(hz, 22050, 1.0), 22050))
    loaded = waveforms.load(str(path), 8000)
    assert len(loaded) == 8000
    assert abs(peak_hz(loaded, 8000) - hz) <= 1.0
    assert np.isclose(np.sqrt(np.mean(loaded[500:-500] ** 2)), 0.5 / np.sqrt(2), rtol=0.02)


def test_lowering_the_rate_removes_tones_above_the_new_nyquist_instead_of_aliasing():
    high = tone(3000.0, 16000, 1.0)  # above 2 kHz, the Nyquist frequency of 4 kHz
    resampled = waveforms.resample(high.astype(np.float32), 16000, 4000)
    assert np.sqrt(np.mean(resampled ** 2)) < 0.01
    # Linear interpolation would fold it to 1 kHz at full level:
    naive = np.interp(np.arange(4000) * 4, np.arange(16000), high)
    assert np.sqrt(np.mean(naive ** 2)) > 0.3


def test_up_then_down_is_the_identity_for_band_limited_sound():
    rng = np.random.default_rng(random_seed())
    sound = sum(tone(float(hz), 8000, 0.5, 0.2) for hz in rng.uniform(100, 3500, size=4))
    sound = sound.astype(np.float32)
    back = waveforms.resample(waveforms.resample(sound, 8000, 44100), 44100, 8000)
    np.testing.assert_allclose(back, sound, atol=1e-4)


def test_clips_are_windows_of_the_sound_or_zero_padded():
    rng = np.random.default_rng(random_seed())
    sound = rng.standard_normal(1000).astype(np.float32)
    first = waveforms.clip(sound, 300)
    np.testing.assert_array_equal(first, sound[:300])
    starts = set()
    for _ in range(20):
        window = waveforms.clip(sound, 300, rng)
        start = int(np.flatnonzero(sound == window[0])[0])
        np.testing.assert_array_equal(window, sound[start : start + 300])
        starts.add(start)
    assert len(starts) > 10
    padded = waveforms.clip(sound[:100], 300, rng)
    np.testing.assert_array_equal(padded, np.concatenate([sound[:100], np.zeros(200, np.float32)]))


def test_unreadable_sounds_raise_audio_error_saying_why(tmp_path):
    good = wav_bytes(tone(440.0, 8000, 0.1), 8000)
    cases = {
        "missing file": str(tmp_path / "nope.wav"),
        "unreadable sound": np.random.default_rng(random_seed()).bytes(200),
    }
    for reason, source in cases.items():
        with pytest.raises(waveforms.AudioError, match=reason):
            waveforms.load(source, 8000)
    with pytest.raises(waveforms.AudioError):
        waveforms.load(good[:30], 8000)  # cut inside the header
    assert len(waveforms.load(good[: len(good) - 301], 8000)) == 800 - 151  # cut in the data
