"""Built-in data: coloured shapes on textured backgrounds, with captions and optional sounds.

Why: a demo and the tests need paired data that costs no download, renders in
tens of microseconds, and has structure a small two- or three-tower model can
learn in a few CPU minutes, while still forcing the text tower to read (word
order varies across caption templates) and the image tower to see shape,
colour, size and position.

Each example shows one shape (circle, square, triangle, cross) in one of six
colours, small or large, near one of five places (four quadrants and the
centre), with position/size/colour jitter, a small rotation, and a grey
background with a gradient, stripes and pixel noise. The zero-shot classes are
colour x shape (24); size and place appear only in the captions.

On request (`with_audio=True`) each example also has a sound clip that encodes
the same attributes as its caption: colour -> pitch (six fundamentals a factor
~1.4 apart), shape -> timbre (circle: sine; square: odd harmonics 1/k;
triangle: odd harmonics 1/k^2; cross: all harmonics 1/k), size -> loudness and
duration (large: louder and longer), place -> onset time within the clip. Pitch
(+-3%), loudness, onset and harmonic phases are jittered and white noise of a
random level is added, so the sounds are learnable but not trivial.

Example `i` of a split is a pure function of (seed, split, i): its random
generator is `np.random.default_rng([seed, split_id, i])`, so any example can be
drawn in any order, by any process, without state. The sound draws from its own
generator, `default_rng([seed, split_id, i, 1])`, so images are the same with or
without audio.
"""

import functools
import itertools
import math

import numpy as np

from bigalign.errors import UserError

SPLITS = {"train": 0, "eval": 1, "test": 2}  # split name -> id folded into the seed

SHAPES = ("circle", "square", "triangle", "cross")
COLOUR_RGB = {
    "red": (220, 45, 45),
    "orange": (245, 140, 35),
    "yellow": (235, 215, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 225),
    "purple": (150, 65, 205),
}
COLOURS = tuple(COLOUR_RGB)
SIZES = ("small", "large")
# place -> (row, column) of the shape's centre as a fraction of the image side.
PLACES = {
    "top left": (0.27, 0.27),
    "top right": (0.27, 0.73),
    "bottom left": (0.73, 0.27),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
# place -> the phrase a caption uses for it ("a red circle at the top left").
PLACE_PHRASES = {place: f"at the {place}" for place in PLACES}
PLACE_PHRASES["center"] = "in the center"
# Phrasings with different word orders, so the text tower has to read the whole caption.
TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "{place}: a {size} {colour} {shape}",
    "there is a {size} {colour} {shape} {where}",
    "{where} is a {size} {colour} {shape}",
)
# Shape "radius" as a fraction of the image side, per size word: (low, high).
RADIUS_RANGE = {"small": (0.10, 0.13), "large": (0.18, 0.22)}
POSITION_JITTER = 0.05  # fraction of the image side
MAX_ROTATION_DEGREES = 15.0
COLOUR_JITTER = 15  # per channel, uniform in [-J, J]

# colour -> fundamental frequency (Hz) of its sound: about a factor 1.4 apart, two or
# more mel bins apart at 32 bins over 0-4 kHz, and low enough that the highest keeps
# its third harmonic below the band limit at 8 kHz.
PITCH_HZ = {"red": 220, "orange": 310, "yellow": 430, "green": 600, "blue": 840, "purple": 1180}
PITCH_JITTER = 0.03  # relative, uniform in [-J, J]
SIZE_LOUDNESS = {"small": 0.2, "large": 0.5}  # amplitude of an equally loud sine
LOUDNESS_JITTER = 0.2  # relative, uniform in [-J, J]
SIZE_DURATION = {"small": 0.3, "large": 0.5}  # fraction of the clip the tone lasts
# place -> when the tone starts, as a fraction of the clip (the tone always ends inside it).
PLACE_ONSET = {
    "top left": 0.02,
    "top right": 0.12,
    "bottom left": 0.22,
    "bottom right": 0.32,
    "center": 0.42,
}
ONSET_JITTER = 0.02  # fraction of the clip, uniform in [-J, J]
NOISE_STD_RANGE = (0.005, 0.03)  # white background noise, std uniform in the range
RAMP_SECONDS = 0.01  # raised-cosine fade in and out, so that onsets do not click
BAND_LIMIT = 0.95  # harmonics stop at this fraction of the Nyquist frequency (no aliasing)
# The lowest sample rate at which the highest (jittered) pitch keeps its third harmonic.
MIN_SAMPLE_RATE = math.ceil(2 * 3 * max(PITCH_HZ.values()) * (1 + PITCH_JITTER) / BAND_LIMIT)

CLASS_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
NUM_CLASSES = len(CLASS_NAMES)


def class_index(colour: str, shape: str) -> int:
    """The zero-shot class of a (colour, shape) pair: an index into CLASS_NAMES."""
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def caption(template: int, size: str, colour: str, shape: str, place: str) -> str:
    """One caption: TEMPLATES[template] filled with the attributes."""
    return TEMPLATES[template].format(
        size=size, colour=colour, shape=shape, place=place, where=PLACE_PHRASES[place]
    )


def class_prompts(label: int) -> list[str]:
    """Every caption of class `label` (all sizes x places x templates), for prompt ensembling.

    All classes have the same number of prompts, len(SIZES) * len(PLACES) * len(TEMPLATES).
    """
    if not 0 <= label < NUM_CLASSES:
        raise UserError(f"class label {label} is out of range [0, {NUM_CLASSES})")
    colour, shape = COLOURS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    return [
        caption(template, size, colour, shape, place)
        for size, place, template in itertools.product(SIZES, PLACES, range(len(TEMPLATES)))
    ]


def caption_corpus() -> list[str]:
    """Every caption the generator can produce (in a fixed order), e.g. to train a tokenizer."""
    return [text for label in range(NUM_CLASSES) for text in class_prompts(label)]


@functools.lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (rows [H, 1], columns [1, W]) in pixels, shared across examples."""
    centres = np.arange(image_size, dtype=np.float32) + 0.5
    return centres[:, None], centres[None, :]


def _signed_distance(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Approximate signed distance (pixels; negative inside) to a shape centred at the origin."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        half_side = 0.85 * radius  # about the circle's area
        return np.maximum(np.abs(dx), np.abs(dy)) - half_side
    if shape == "triangle":
        circumradius = 1.25 * radius  # pointing up; rows grow downwards
        edges = np.maximum(dy, np.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy))
        return edges - 0.5 * circumradius
    if shape == "cross":
        arm, thickness = 1.05 * radius, 0.35 * radius
        ax, ay = np.abs(dx), np.abs(dy)
        horizontal = np.maximum(ax - arm, ay - thickness)
        vertical = np.maximum(ax - thickness, ay - arm)
        return np.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, rows, cols, image_size: int) -> np.ndarray:
    """A grey, low-saturation texture: gradient + stripes + slight tint. float32 [H, W, 3]."""
    # Python floats keep the arithmetic in float32 (NumPy scalars would promote to float64).
    grey, angle, amplitude, phase = (
        float(x) for x in rng.uniform([70.0, 0.0, 0.0, 0.0], [180.0, np.pi, 20.0, 2 * np.pi])
    )
    gradient_y, gradient_x = (float(x) / image_size for x in rng.uniform(-30.0, 30.0, size=2))
    frequency = float(rng.uniform(1.0, 4.0)) * 2 * np.pi / image_size  # 1-4 stripes per image
    tint = rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
    projection = (math.cos(angle) * cols + math.sin(angle) * rows) * frequency + phase
    luminance = (
        grey
        + gradient_y * (rows - image_size / 2)
        + gradient_x * (cols - image_size / 2)
        + amplitude * np.sin(projection)
    )  # [H, W]
    return luminance[:, :, None] + tint  # [H, W, 3]


def render(
    rng: np.random.Generator, image_size: int, shape: str, colour: str, size: str, place: str
) -> np.ndarray:
    """Draws one example with `rng`: uint8 [image_size, image_size, 3]."""
    rows, cols = _pixel_grid(image_size)
    image = _background(rng, rows, cols, image_size)

    centre_row, centre_col = np.array(PLACES[place]) + rng.uniform(
        -POSITION_JITTER, POSITION_JITTER, size=2
    )
    radius = float(rng.uniform(*RADIUS_RANGE[size])) * image_size
    theta = math.radians(float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)))
    dy0 = rows - float(centre_row) * image_size  # [H, 1]
    dx0 = cols - float(centre_col) * image_size  # [1, W]
    cos, sin = math.cos(theta), math.sin(theta)
    dx, dy = cos * dx0 + sin * dy0, cos * dy0 - sin * dx0  # rotate the frame
    # One-pixel-wide anti-aliased edge: coverage falls from 1 to 0 across the boundary.
    coverage = np.clip(0.5 - _signed_distance(shape, dy, dx, radius), 0.0, 1.0)[:, :, None]

    rgb = np.array(COLOUR_RGB[colour], np.float32) + rng.uniform(
        -COLOUR_JITTER, COLOUR_JITTER, size=3
    ).astype(np.float32)
    image = image + coverage * (rgb - image)  # [H, W, 3]
    noise_std = float(rng.uniform(2.0, 8.0))  # luminance noise, shared by the channels
    image = image + noise_std * rng.standard_normal((image_size, image_size, 1), dtype=np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def harmonic_weights(shape: str, harmonics: np.ndarray) -> np.ndarray:
    """Amplitude of each harmonic number (1 = the fundamental) in the timbre of `shape`."""
    k = harmonics.astype(np.float64)
    odd = k % 2 == 1
    if shape == "circle":  # a sine
        return (k == 1).astype(np.float64)
    if shape == "square":  # a band-limited square wave
        return np.where(odd, 1 / k, 0.0)
    if shape == "triangle":  # a band-limited triangle wave (phases aside)
        return np.where(odd, 1 / k**2, 0.0)
    if shape == "cross":  # a band-limited sawtooth
        return 1 / k
    raise ValueError(f"unknown shape {shape!r}")


def render_audio(
    rng: np.random.Generator,
    num_samples: int,
    sample_rate: int,
    shape: str,
    colour: str,
    size: str,
    place: str,
) -> np.ndarray:
    """Synthesises one example's sound with `rng`: float32 waveform [num_samples]."""
    fundamental = PITCH_HZ[colour] * (1 + float(rng.uniform(-PITCH_JITTER, PITCH_JITTER)))
    harmonics = np.arange(1, int(BAND_LIMIT * sample_rate / 2 / fundamental) + 1)
    weights = harmonic_weights(shape, harmonics)
    harmonics, weights = harmonics[weights > 0], weights[weights > 0]  # [K] each
    weights = weights / np.sqrt(np.sum(weights**2))  # as loud (RMS) as a sine of the amplitude
    amplitude = SIZE_LOUDNESS[size] * (1 + float(rng.uniform(-LOUDNESS_JITTER, LOUDNESS_JITTER)))
    onset_fraction = PLACE_ONSET[place] + float(rng.uniform(-ONSET_JITTER, ONSET_JITTER))
    onset = min(max(int(onset_fraction * num_samples), 0), num_samples - 1)
    length = min(int(SIZE_DURATION[size] * num_samples), num_samples - onset)
    phases = rng.uniform(0, 2 * np.pi, size=(len(harmonics), 1)).astype(np.float32)  # [K, 1]

    # float32 sines are an order of magnitude faster; the phase error (<1e-3 rad) is inaudible.
    angular = (2 * np.pi * fundamental / sample_rate * harmonics[:, None]).astype(np.float32)
    partials = np.sin(angular * np.arange(length, dtype=np.float32) + phases)  # [K, T]
    ramp = min(int(RAMP_SECONDS * sample_rate), length // 2)
    envelope = np.ones(length, np.float32)
    fade_in = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp, dtype=np.float32) / ramp)  # 0 -> 1
    envelope[:ramp] = fade_in
    envelope[length - ramp :] = fade_in[::-1]
    tone = np.float32(amplitude) * envelope * (weights.astype(np.float32) @ partials)  # [T]

    noise_std = float(rng.uniform(*NOISE_STD_RANGE))
    waveform = noise_std * rng.standard_normal(num_samples, dtype=np.float32)
    waveform[onset : onset + length] += tone
    return waveform


class ExampleIndexError(UserError, IndexError):
    """An index outside [0, len(source)): a ValueError (UserError) and an IndexError."""


class ShapesSource:
    """Random-access source of shape images with captions (usable with `grain.MapDataset.source`).

    `source[i]` -> {"image": uint8 [H, W, 3], "caption": str, "label": int32 scalar},
    where label indexes CLASS_NAMES (colour x shape). With `with_audio=True` it also
    has "audio": a float32 waveform [clip_samples] at `sample_rate` Hz; sounds are only
    synthesised when asked for, so image-text runs do not pay for them.
    """

    def __init__(
        self,
        split: str,
        num_examples: int,
        image_size: int,
        seed: int,
        *,
        with_audio: bool = False,
        sample_rate: int = 8000,
        clip_samples: int = 4000,
    ):
        if split not in SPLITS:
            valid = ", ".join(SPLITS)
            raise UserError(f"unknown split {split!r} for the shapes data; valid: {valid}")
        if num_examples <= 0:
            raise UserError(f"num_examples={num_examples} must be positive")
        if not 8 <= image_size <= 1024:
            raise UserError(f"image_size={image_size} must lie in [8, 1024]")
        if with_audio and sample_rate < MIN_SAMPLE_RATE:
            raise UserError(
                f"sample_rate={sample_rate} is too low for the shapes sounds; "
                f"use at least {MIN_SAMPLE_RATE} Hz"
            )
        if with_audio and clip_samples <= 0:
            raise UserError(f"clip_samples={clip_samples} must be positive")
        self.split = split
        self.num_examples = num_examples
        self.image_size = image_size
        self.seed = seed
        self.with_audio = with_audio
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise ExampleIndexError(
                f"index {index} is out of range for the {self.split!r} shapes split "
                f"of {self.num_examples} examples"
            )
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = SIZES[rng.integers(len(SIZES))]
        place = list(PLACES)[rng.integers(len(PLACES))]
        template = int(rng.integers(len(TEMPLATES)))
        example = {
            "image": render(rng, self.image_size, shape, colour, size, place),
            "caption": caption(template, size, colour, shape, place),
            "label": np.int32(class_index(colour, shape)),
        }
        if self.with_audio:
            audio_rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 1])
            example["audio"] = render_audio(
                audio_rng, self.clip_samples, self.sample_rate, shape, colour, size, place
            )
        return example

    def __repr__(self) -> str:
        audio = (
            f", with_audio=True, sample_rate={self.sample_rate}, clip_samples={self.clip_samples}"
            if self.with_audio
            else ""
        )
        return (
            f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed}{audio})"
        )
