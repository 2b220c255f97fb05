"""Log-mel spectrograms in NumPy, vectorised over a batch of waveforms.

waveforms [B, S] -> frames of `frame_length` samples every `hop_length` samples
-> periodic Hann window -> power spectrum (np.fft.rfft) -> triangular mel
filterbank -> log. The audio tower reads the result as a one-channel image
[B, frames, mels]. Computing it per batch, in the input pipeline, keeps the
model free of signal processing and lets one FFT call cover the whole batch.

The mel scale is HTK's, mel = 2595 log10(1 + hz / 700); the filters are
triangles in mel, evenly spaced from `lower_hz` to `upper_hz` (default: 0 Hz to
Nyquist), with the same weights as `tf.signal.linear_to_mel_weight_matrix`.
The power spectrum is scaled (by 1 / (fft_length * sum(window^2))) so that the
energies are densities: a sine of amplitude A whose window main lobe lies inside
one filter gives that filter about A^2 / 4 (times the filter's weight at the
tone), and white noise a level proportional to the filter's width in Hz,
whatever the frame and FFT lengths.
"""

import numpy as np

from bigalign.errors import UserError

# Added to the mel energies before the log: the quietest level that still counts.
LOG_FLOOR = 1e-6


def hz_to_mel(hz):
    """Frequency in Hz -> HTK mel."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    """HTK mel -> frequency in Hz (the inverse of `hz_to_mel`)."""
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def num_frames(num_samples: int, frame_length: int, hop_length: int) -> int:
    """How many whole frames fit in `num_samples` (no padding): 0 if not even one."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // hop_length


def _band_edges_mel(num_mel_bins: int, sample_rate: int, lower_hz: float, upper_hz) -> np.ndarray:
    """M + 2 evenly spaced mels: filter j rises from edge j, peaks at j + 1, ends at j + 2."""
    upper_hz = sample_rate / 2 if upper_hz is None else upper_hz
    if not 0 <= lower_hz < upper_hz <= sample_rate / 2:
        raise UserError(
            f"mel band edges must satisfy 0 <= lower_hz < upper_hz <= sample_rate / 2; "
            f"got {lower_hz}, {upper_hz} at sample_rate={sample_rate}"
        )
    return np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_mel_bins + 2)


def mel_bin_centres(
    num_mel_bins: int, sample_rate: int, lower_hz: float = 0.0, upper_hz: float | None = None
) -> np.ndarray:
    """Centre frequency in Hz of each mel filter: float64 [num_mel_bins], ascending."""
    return mel_to_hz(_band_edges_mel(num_mel_bins, sample_rate, lower_hz, upper_hz)[1:-1])


def mel_filterbank(
    num_mel_bins: int,
    fft_length: int,
    sample_rate: int,
    lower_hz: float = 0.0,
    upper_hz: float | None = None,
) -> np.ndarray:
    """Triangular mel filters: float32 [fft_length // 2 + 1, num_mel_bins], column j is filter j.

    Multiplying a power spectrum [..., fft_length // 2 + 1] by it gives mel energies
    [..., num_mel_bins]. Each filter is 1 at its centre frequency and falls linearly
    (in mel) to 0 at its neighbours' centres.
    """
    edges = _band_edges_mel(num_mel_bins, sample_rate, lower_hz, upper_hz)  # [M + 2]
    fft_mels = hz_to_mel(np.fft.rfftfreq(fft_length, d=1.0 / sample_rate))[:, None]  # [K, 1]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # [M] each
    rising = (fft_mels - lower) / (centre - lower)  # [K, M]
    falling = (upper - fft_mels) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_spectrogram(
    waveforms: np.ndarray,
    *,
    sample_rate: int,
    num_mel_bins: int,
    frame_length: int,
    hop_length: int,
    fft_length: int | None = None,
) -> np.ndarray:
    """float32 waveforms [B, S] -> log mel energies float32 [B, frames, num_mel_bins].

    frames = num_frames(S, frame_length, hop_length); the samples after the last
    whole frame are dropped. `fft_length` defaults to the smallest power of two
    >= frame_length (frames are zero-padded to it).
    """
    waveforms = np.asarray(waveforms, np.float32)
    if waveforms.ndim != 2:
        raise UserError(f"waveforms must be [batch, samples]; got shape {waveforms.shape}")
    fft_length = fft_length or 1 << (frame_length - 1).bit_length()
    if hop_length < 1 or fft_length < frame_length:
        raise UserError(
            f"need hop_length >= 1 and fft_length >= frame_length; got hop_length={hop_length}, "
            f"frame_length={frame_length}, fft_length={fft_length}"
        )
    count = num_frames(waveforms.shape[1], frame_length, hop_length)
    if count == 0:
        raise UserError(
            f"{waveforms.shape[1]} samples are shorter than one frame of {frame_length}"
        )
    frames = np.lib.stride_tricks.sliding_window_view(waveforms, frame_length, axis=1)
    frames = frames[:, : count * hop_length : hop_length]  # [B, frames, frame_length], a view
    # Periodic Hann (as tf.signal.hann_window and torch.hann_window use by default).
    window = np.hanning(frame_length + 1)[:-1].astype(np.float32)
    spectrum = np.fft.rfft(frames * window, n=fft_length, axis=-1)  # complex [B, frames, K]
    power = (spectrum.real**2 + spectrum.imag**2) / np.float32(fft_length * np.sum(window**2))
    mel = power @ mel_filterbank(num_mel_bins, fft_length, sample_rate)  # [B, frames, mels]
    return np.log(mel + np.float32(LOG_FLOOR)).astype(np.float32)
