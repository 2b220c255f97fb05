"""Helpers shared by the train-step tests: the model and state on a mesh, gradient comparison."""

import jax
import jax.numpy as jnp
import numpy as np

import bigalign


def setup(config, data_shards: int, fsdp: int = 1, *, state_cache: dict | None = None):
    """(run, initial TrainState) for `config` on a (data_shards, fsdp) mesh, via bigalign.build.

    With `state_cache`, the initial state is built once per mesh shape and copied after:
    for tests whose configs share the seed, towers and optimizer structure (dropout, the
    loss and the learning rate do not change it), since compiling it takes seconds.
    """
    config.mesh.data, config.mesh.fsdp = data_shards, fsdp
    run = bigalign.build(config)
    if state_cache is None:
        return run, run.init_state()
    if (data_shards, fsdp) not in state_cache:
        state_cache[data_shards, fsdp] = run.init_state()
    return run, jax.tree.map(jnp.copy, state_cache[data_shards, fsdp])


def random_global_batch(run, rng: np.random.Generator) -> dict:
    """A random batch of the run's shapes, as global arrays on its mesh."""
    return run.global_batch(run.random_batch(rng))


def assert_trees_close(actual, expected, *, rtol: float) -> None:
    """Per-element `rtol`, plus absolute slack of 1e-5 of the largest entry of `expected`.

    Whole-model gradients sum in another order on 8 shards, and some are exactly 0 in exact
    math (attention key biases; the logit bias under softmax) but come out as float32 noise.
    """
    slack = 1e-5 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(expected))
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=slack)


def random_seed() -> int:
    """A fresh seed per test run: tests hold for any data, not one lucky draw."""
    return int(np.random.randint(0, 2**31 - 1))


WORDS = ("red", "blue", "green", "cat", "dog", "bird", "on", "a", "the", "grass", "sofa", "sky")


def write_image_folder(folder, count: int, rng: np.random.Generator, *, truncated=()) -> str:
    """`count` random PNGs of varied sizes under folder/images and an open_clip-style CSV
    index (filepath,caption; paths relative to the CSV). Rows in `truncated` get a PNG cut
    in half. Returns the CSV's path."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filepath,caption"]
    for i in range(count):
        height, width = (int(v) for v in rng.integers(24, 64, size=2))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / "images" / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        if i in truncated:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
        rows.append(f"images/{i:04d}.png,{caption}")
    index = folder / "index.csv"
    index.write_text("\n".join(rows) + "\n")
    return str(index)


def write_sound_folder(folder, count: int, rng: np.random.Generator, *, rate: int = 16000) -> str:
    """`count` 16-bit mono WAVs of random tones and lengths (0.2-0.8 s) under folder/sounds
    and a CSV index with columns sound,caption. Returns the CSV's path."""
    import wave

    (folder / "sounds").mkdir(parents=True, exist_ok=True)
    rows = ["sound,caption"]
    for i in range(count):
        t = np.arange(int(rng.integers(rate // 5, 4 * rate // 5))) / rate
        samples = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
        with wave.open(str(folder / "sounds" / f"{i:04d}.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
        rows.append(f"sounds/{i:04d}.wav,{caption}")
    index = folder / "sounds.csv"
    index.write_text("\n".join(rows) + "\n")
    return str(index)
