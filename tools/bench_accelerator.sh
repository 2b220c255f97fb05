#!/usr/bin/env bash
# The GPU/TPU benchmark, in one go (a few minutes on one H100/H200; more devices, more batch).
#
#   tools/bench_accelerator.sh [OUT_DIR]        # default: bench-accelerator-<date>
#
# 1. The accelerator and the software (nvidia-smi where there is one, jax's devices).
# 2. A correctness check on the device: the towers' attention through the platform's fused
#    kernel (cuDNN on NVIDIA GPUs, bf16) against XLA's, and every loss variant's value and
#    gradients against the all-gather softmax / sigmoid on the same inputs.
# 3. tools/bench_step.py: ViT-B/16 SigLIP (configs/siglip_b16.py: bf16, scan, remat
#    dots_no_batch, sigmoid_chunked) at 256 examples per device: samples/s, MFU against
#    the measured and the datasheet bf16 peak; then the same without remat.
# 4. tools/bench_loss.py: the loss variants at global batches $BATCHES (default 32768 and
#    65536; 131072 and 262144 on 8 or more devices), time and compiled memory per device,
#    each ring variant against its all-gather counterpart, which is skipped where it
#    would not fit.
# Every command's output is kept in OUT_DIR, one file per step, and shown as it runs.
# Nothing here needs a GPU to be read: CI never runs it; docs/benchmarks.md has its results.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-bench-accelerator-$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
python=${PYTHON:-python}
devices=$("$python" -c 'import jax; print(jax.device_count())')
batches=${BATCHES:-32768,65536}
if [[ -z ${BATCHES:-} && $devices -ge 8 ]]; then
    batches=32768,65536,131072,262144
fi

step() {  # step NAME COMMAND...: run it, tee its output to OUT_DIR/NAME.txt
    local name=$1
    shift
    echo "=== $name: $*" | tee "$out/$name.txt"
    "$@" 2>&1 | tee -a "$out/$name.txt"
}

if command -v nvidia-smi >/dev/null; then
    step gpu nvidia-smi
fi
step devices "$python" -c 'import jax; print(jax.__version__, jax.devices())'

step correctness "$python" - <<'EOF'
"""The fused attention kernel and the loss variants on this device, against references."""
import jax
import jax.numpy as jnp
import numpy as np

from bigalign import losses
from bigalign.models import transformer

rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((8, 197, 12, 64)), jnp.bfloat16) for _ in range(3))
lengths = jnp.asarray(rng.integers(1, 198, 8), jnp.int32)
for causal in (False, True):
    fused = transformer.dot_product_attention(q, k, v, causal=causal, key_lengths=lengths)
    plain = transformer.heads_major_attention(q, k, v, causal=causal, key_lengths=lengths)
    error = float(jnp.max(jnp.abs(fused.astype(jnp.float32) - plain.astype(jnp.float32))))
    print(f"attention ({transformer.attention_implementation(jnp.bfloat16)}, causal={causal}) "
          f"vs heads_major: max abs difference {error:.2e}")
    assert error < 2e-2, error

x, y = (rng.standard_normal((4096, 512)).astype(np.float32) for _ in range(2))
x, y = (jnp.asarray(a / np.linalg.norm(a, axis=1, keepdims=True)) for a in (x, y))
with jax.default_matmul_precision("highest"):
    results = {}
    for name in losses.NAMES:
        value_and_grad = jax.jit(jax.value_and_grad(
            lambda x, y, s, b, name=name: losses.compute(name, x, y, scale=s, bias=b),
            argnums=(0, 1, 2, 3)))
        results[name] = value_and_grad(x, y, jnp.float32(10.0), jnp.float32(-10.0))
    for lean, gathered in (("softmax_tiled", "softmax"), ("sigmoid_chunked", "sigmoid")):
        error = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(results[lean]), jax.tree.leaves(results[gathered])))
        print(f"{lean} vs {gathered}: max abs difference of value and gradients {error:.2e}")
        assert error < 1e-5, error
print("correct")
EOF

siglip=(--config configs/siglip_b16.py --config.data.name=shapes --config.data.zeroshot_name=
        --config.mesh.fsdp="$devices" --config.batch_size=$((256 * devices)) --steps 10)
step step_siglip_b16 "$python" tools/bench_step.py "${siglip[@]}"
step step_siglip_b16_no_remat "$python" tools/bench_step.py "${siglip[@]}" --config.model.remat=none
step losses "$python" tools/bench_loss.py --batch-sizes "$batches" --repeats 3
echo "results in $out/"
