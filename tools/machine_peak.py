"""The machine's matmul peak, measured in the same run as the benchmark it is quoted in.

Why: an MFU or a "fraction of peak" is only as honest as its denominator, and a CPU's
(or a shared machine's) real rate differs from its datasheet; so every benchmark in
tools/ times a large square matmul on one device itself and reports against that.
On GPUs and TPUs `published_peak` adds the vendor's dense bf16 number per device.
"""

import time

import jax
import jax.extend
import jax.numpy as jnp

# Dense (no sparsity) bf16 TFLOP/s per device, from the vendors' datasheets.
PUBLISHED_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def best_seconds(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` timed calls of a compiled `fn` (after one warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate(m: int, k: int, n: int, dtype=jnp.float32, *, transpose_a: bool = False,
                repeats: int = 5, device=None) -> float:
    """FLOP/s of one [m, k] x [k, n] product on `device` (default: the first).

    `transpose_a` stores the left operand as [k, m] and contracts its first axis, the
    layout of a weight or embedding gradient (G^T @ x), which some backends run slower.
    """
    device = device or jax.devices()[0]
    keys = jax.random.split(jax.random.key(0))
    a_shape = (k, m) if transpose_a else (m, k)
    a = jax.device_put(jax.random.normal(keys[0], a_shape, dtype), device)
    b = jax.device_put(jax.random.normal(keys[1], (k, n), dtype), device)
    equation = "km,kn->mn" if transpose_a else "mk,kn->mn"
    product = jax.jit(lambda a, b: jnp.einsum(equation, a, b, preferred_element_type=dtype))
    return 2 * m * k * n / best_seconds(product, a, b, repeats=repeats)


def matmul_peak(dtype=jnp.float32, size: int | None = None, *, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on one device: 2048 on CPU, 8192 on accelerators."""
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    return matmul_rate(size, size, size, dtype, repeats=repeats)


def published_peak(device=None) -> float | None:
    """The datasheet dense bf16 FLOP/s of `device`, or None (CPUs, unknown kinds)."""
    kind = (device or jax.devices()[0]).device_kind
    matches = [name for name in PUBLISHED_BF16_TFLOPS if name.lower() in kind.lower()]
    return PUBLISHED_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


def describe_peaks(dtypes=(jnp.float32, jnp.bfloat16)) -> dict:
    """{"float32": FLOP/s, "bfloat16": FLOP/s, "published bf16": FLOP/s or None}, measured now."""
    peaks = {jnp.dtype(d).name: matmul_peak(d) for d in dtypes}
    peaks["published bf16"] = published_peak()
    return peaks


def _products(jaxpr, times: int, found: dict) -> None:
    """Adds every dot_general and convolution of `jaxpr` (and of its sub-jaxprs; a scan's
    body counts `length` times) to found: {key: [equation, count]}."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            key = (eqn.primitive.name, tuple((v.aval.shape, v.aval.dtype) for v in eqn.invars),
                   repr(sorted(eqn.params.items())))
            found.setdefault(key, [eqn, 0])[1] += times
        repeat = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _products(sub.jaxpr, repeat, found)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _products(sub, repeat, found)


def products_alone(fn, *args, repeats: int = 3) -> tuple[float, float, int]:
    """(seconds, FLOPs, count) of the matmuls and convolutions `fn(*args)` performs, forward
    and backward as its jaxpr has them, each shape timed alone on one device.

    Why: the step cannot be faster than its own products, and small or transposed
    products run below the square-matmul peak; so the time they take alone bounds what
    any removal of the other work (elementwise ops, copies, transposes) could reach.
    """
    found = {}
    _products(jax.make_jaxpr(fn)(*args).jaxpr, 1, found)
    keys = jax.random.split(jax.random.key(0), 2)
    seconds = flops = count = 0
    for eqn, times in found.values():
        operands = [jax.random.normal(k, v.aval.shape).astype(v.aval.dtype)
                    for k, v in zip(keys, eqn.invars)]
        product = jax.jit(lambda *xs, eqn=eqn: eqn.primitive.bind(*xs, **eqn.params))
        compiled = product.lower(*operands).compile()  # compiled once: timed and counted
        flops += times * compiled.cost_analysis()["flops"]
        seconds += times * best_seconds(compiled, *operands, repeats=repeats)
        count += times
    return seconds, flops, count
