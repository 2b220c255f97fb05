"""Tests for bigalign.data.audio: frames, the mel filterbank and log-mel spectrograms."""

import numpy as np
import pytest

from bigalign.data import audio
from bigalign.errors import UserError

# (sample_rate, num_mel_bins, frame_length, hop_length): the demo's setting and a finer one.
SETTINGS = [(8000, 32, 256, 120), (16000, 64, 400, 160)]


def tones(frequencies, sample_rate: int, num_samples: int, amplitude: float = 0.5) -> np.ndarray:
    """Sines with random phases: float32 [len(frequencies), num_samples]."""
    times = np.arange(num_samples) / sample_rate
    phases = np.random.uniform(0, 2 * np.pi, size=(len(frequencies), 1))
    frequencies = np.asarray(frequencies, np.float64)[:, None]
    return (amplitude * np.sin(2 * np.pi * frequencies * times + phases)).astype(np.float32)


def test_num_frames_counts_whole_frames():
    assert audio.num_frames(4000, 256, 120) == 32  # the demo: 0.5 s at 8 kHz
    assert audio.num_frames(256, 256, 120) == 1
    assert audio.num_frames(255, 256, 120) == 0
    assert audio.num_frames(256 + 119, 256, 120) == 1
    assert audio.num_frames(256 + 120, 256, 120) == 2
    for _ in range(5):
        frame_length, hop_length = np.random.randint(16, 128), np.random.randint(1, 64)
        num_samples = np.random.randint(frame_length, 2000)
        waveforms = np.random.normal(size=(2, num_samples)).astype(np.float32)
        spectrogram = audio.log_mel_spectrogram(
            waveforms, sample_rate=8000, num_mel_bins=8, frame_length=frame_length,
            hop_length=hop_length,
        )
        frames = audio.num_frames(num_samples, frame_length, hop_length)
        assert spectrogram.shape == (2, frames, 8) and spectrogram.dtype == np.float32
        # The last frame starts at the last hop that still leaves room for a whole frame.
        assert (frames - 1) * hop_length + frame_length <= num_samples
        assert frames * hop_length + frame_length > num_samples


@pytest.mark.parametrize("sample_rate, num_mel_bins, frame_length, hop_length", SETTINGS)
def test_filters_are_triangles_peaking_at_their_centres(
    sample_rate, num_mel_bins, frame_length, hop_length
):
    fft_length = 1 << (frame_length - 1).bit_length()
    filterbank = audio.mel_filterbank(num_mel_bins, fft_length, sample_rate)
    assert filterbank.shape == (fft_length // 2 + 1, num_mel_bins)
    assert filterbank.dtype == np.float32
    assert filterbank.min() >= 0 and filterbank.max() <= 1

    fft_mels = audio.hz_to_mel(np.fft.rfftfreq(fft_length, 1 / sample_rate))
    centre_mels = audio.hz_to_mel(audio.mel_bin_centres(num_mel_bins, sample_rate))
    assert np.all(np.diff(centre_mels) > 0)
    spacing = centre_mels[1] - centre_mels[0]
    for j, centre in enumerate(centre_mels):
        column = filterbank[:, j]
        assert np.argmax(column) == np.argmin(np.abs(fft_mels - centre))
        # Non-zero only between the neighbours' centres.
        assert np.all(column[np.abs(fft_mels - centre) >= spacing] == 0)
        assert column.sum() > 0


def test_mel_scale_is_htk_and_invertible():
    assert audio.hz_to_mel(0.0) == 0.0
    np.testing.assert_allclose(audio.hz_to_mel(700.0), 2595 * np.log10(2))
    hz = np.random.uniform(0, 20000, size=10)
    np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(hz)), hz, rtol=1e-10)


def test_bin_centres_span_the_band_evenly_in_mel():
    lower, upper = np.random.uniform(0, 200), np.random.uniform(2000, 4000)
    centres = audio.mel_bin_centres(20, 8000, lower_hz=lower, upper_hz=upper)
    edges = audio.hz_to_mel(np.concatenate([[lower], centres, [upper]]))
    np.testing.assert_allclose(np.diff(edges), np.diff(edges)[0], rtol=1e-9)
    with pytest.raises(UserError, match="upper_hz <= sample_rate / 2"):
        audio.mel_filterbank(20, 256, 8000, upper_hz=5000.0)


@pytest.mark.parametrize("sample_rate, num_mel_bins, frame_length, hop_length", SETTINGS)
def test_pure_tone_peaks_in_the_nearest_mel_bin(
    sample_rate, num_mel_bins, frame_length, hop_length
):
    centre_mels = audio.hz_to_mel(audio.mel_bin_centres(num_mel_bins, sample_rate))
    spacing = centre_mels[1] - centre_mels[0]
    # Random tones at least 0.2 bins from a midpoint between two centres, above the
    # lowest filters (narrower there than the FFT's resolution).
    bins = np.random.randint(4, num_mel_bins - 1, size=8)
    offsets = np.random.uniform(-0.3, 0.3, size=8)
    frequencies = audio.mel_to_hz(centre_mels[bins] + offsets * spacing)
    waveforms = tones(frequencies, sample_rate, sample_rate // 2)
    spectrogram = audio.log_mel_spectrogram(
        waveforms, sample_rate=sample_rate, num_mel_bins=num_mel_bins,
        frame_length=frame_length, hop_length=hop_length,
    )  # [8, frames, mels]
    loudest = spectrogram.argmax(axis=-1)  # [8, frames]
    for expected, per_frame, hz in zip(bins, loudest, frequencies):
        assert np.all(per_frame == expected), (hz, expected, per_frame)


def test_doubling_the_amplitude_adds_log_4_above_the_floor():
    sample_rate, num_samples = 8000, 4000
    frequencies = np.random.uniform(100, 3500, size=4)  # inside the filters, not at their edge
    waveforms = tones(frequencies, sample_rate, num_samples, amplitude=0.3)
    waveforms += np.random.normal(scale=0.05, size=waveforms.shape).astype(np.float32)
    options = dict(sample_rate=sample_rate, num_mel_bins=32, frame_length=256, hop_length=120)
    quiet = audio.log_mel_spectrogram(waveforms, **options)
    loud = audio.log_mel_spectrogram(2 * waveforms, **options)
    # Where the energy is 1000x the floor, the floor moves the log by less than 1e-3.
    strong = quiet > np.log(audio.LOG_FLOOR) + np.log(1000)
    assert strong.any(axis=-1).all()  # at least each tone's bin in every frame
    np.testing.assert_allclose((loud - quiet)[strong], np.log(4), atol=1e-3)
    assert np.all(loud - quiet <= np.log(4) + 1e-4)  # the floor only ever pulls it down


def test_sine_and_noise_levels_are_calibrated_whatever_the_frame_and_fft_length():
    amplitude, noise_std, sample_rate = 0.3, 0.05, 8000
    sine = tones([1000.0], sample_rate, sample_rate, amplitude=amplitude)  # [1, S]
    noise = np.random.normal(scale=noise_std, size=(1, 16 * sample_rate)).astype(np.float32)
    # 8 wide filters: the Hann main lobe at 1 kHz lies well inside the filter around it.
    at_1khz = audio.mel_filterbank(8, sample_rate, sample_rate)[1000]  # 1 Hz FFT bins: [8]
    for frame_length, fft_length in ((256, 256), (256, 1024), (400, 512), (512, 2048)):
        options = dict(sample_rate=sample_rate, num_mel_bins=8, frame_length=frame_length,
                       hop_length=64, fft_length=fft_length)
        sine_energy = np.exp(audio.log_mel_spectrogram(sine, **options))[0]  # [frames, 8]
        np.testing.assert_allclose(
            sine_energy.max(axis=-1).mean(), at_1khz.max() * amplitude**2 / 4, rtol=0.05
        )
        # White noise: noise_std^2 / fft_length in every FFT bin, summed by each filter.
        filterbank = audio.mel_filterbank(8, fft_length, sample_rate)  # [K, 8]
        expected = noise_std**2 * filterbank.sum(axis=0) / fft_length  # [8]
        noise_energy = np.exp(audio.log_mel_spectrogram(noise, **options))[0].mean(axis=0)
        np.testing.assert_allclose(noise_energy, expected, rtol=0.15)


def test_bad_inputs_are_one_line_errors():
    options = dict(sample_rate=8000, num_mel_bins=8, frame_length=256, hop_length=120)
    with pytest.raises(UserError, match="shorter than one frame"):
        audio.log_mel_spectrogram(np.zeros((2, 100), np.float32), **options)
    with pytest.raises(UserError, match=r"\[batch, samples\]"):
        audio.log_mel_spectrogram(np.zeros(4000, np.float32), **options)
    with pytest.raises(UserError, match="fft_length >= frame_length"):
        audio.log_mel_spectrogram(np.zeros((2, 4000), np.float32), **options, fft_length=128)

