"""bigalign against open_clip (PyTorch) in one run: the same train step, and the losses alone.

    pip install -e ".[compare]"          # torch and open_clip, for this script only
    python tools/bench_vs_openclip.py [--rounds 5] [--steps 3] [--loss-batches 2048,8192]

Everything runs on this machine's CPU, one process, float32, both frameworks on every
core, taking turns (round-robin), so load from anything else hits both alike.

Train step: `bench_configs.clip_ti_config()` (ViT-Ti/16 at 112 px, 6-layer text tower,
77 tokens, batch 64) built in both. open_clip's model gets the matching options
(no ln_pre, class-token pooling, LayerNorm eps 1e-6, tanh GELU) and its random initial
weights are copied into bigalign (bigalign/published/open_clip.py), so the first losses
agree: the table prints their difference. open_clip's step is its training loop's:
forward, ClipLoss, backward, global-norm clipping at 1.0, fused AdamW (weight decay on
the matrices, as bigalign's). bigalign's is `Run.train_step`. Per round each takes
`--steps` steps; the table gives the median step time over rounds, samples/s, the
ratio, and MFU: bigalign's count of the step's matmul FLOPs over the time, against
the float32 matmul peak measured in this run. The last row is the step's matmuls and
convolutions (forward and backward, as its jaxpr has them), each shape timed alone:
the most any removal of the other work could reach, so the MFU that row gives is
the ceiling for this model's shapes on this machine.

Losses: forward + backward (w.r.t. both embeddings and the scale, and the bias for
sigmoid) at each global batch B, D = `--dim`, one device. bigalign's all-gather and
ring variants against open_clip's ClipLoss / SigLipLoss. Against each variant's matmul
FLOPs (6 B^2 D for the all-gather variants: the logits, and their gradient against
each embedding; 8 B^2 D for the ring ones, which recompute the logits), the table
gives its rate and that rate over the machine's: the three [B, D] x [D, B],
[B, B] x [B, D] and [B, B]^T x [B, D] products timed alone, in this run.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bigalign  # noqa: E402
from bigalign import losses  # noqa: E402
from bigalign.models.sizes import parse_variant  # noqa: E402
from bigalign.models.vit import normalise_pixels  # noqa: E402
from bigalign.metrics import markdown_table  # noqa: E402
from bench_configs import clip_ti_config  # noqa: E402
from machine_peak import best_seconds, matmul_peak, matmul_rate, products_alone  # noqa: E402
from bigalign.published.open_clip import params_from_open_clip  # noqa: E402

try:
    import open_clip
    from open_clip.loss import SigLipLoss
    import torch
except ImportError:
    sys.exit("tools/bench_vs_openclip.py needs torch and open_clip: pip install -e '.[compare]'")

# bigalign variant -> the open_clip loss it is timed against
COUNTERPARTS = {"softmax": "ClipLoss", "softmax_tiled": "ClipLoss", "sigmoid": "SigLipLoss",
                "sigmoid_chunked": "SigLipLoss"}
RING_VARIANTS = ("softmax_tiled", "sigmoid_chunked")


def open_clip_model(config):
    """open_clip's CLIP with bigalign's architecture for `config` (two towers)."""
    image, text = config.model.image, config.model.text
    dims, patch = parse_variant(image.variant)
    common = dict(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})
    vision_cfg = dict(image_size=config.data.image_size, patch_size=patch, width=dims["width"],
                      layers=dims["depth"], head_width=dims["width"] // dims["num_heads"],
                      mlp_ratio=dims["mlp_dim"] / dims["width"], no_ln_pre=True, pool_type="tok",
                      **common)
    text_cfg = dict(context_length=config.text.max_len, vocab_size=config.text.vocab_size,
                    width=text.width, heads=text.num_heads, layers=text.depth,
                    mlp_ratio=text.mlp_dim / text.width, pool_type="last", **common)
    torch.manual_seed(0)
    return open_clip.model.CLIP(config.model.embed_dim, vision_cfg, text_cfg)


def step_inputs(config, rng):
    """uint8 images and full-length token ids (no padding, so both pool the last token)."""
    size = config.data.image_size
    pixels = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(1, config.text.vocab_size, (config.batch_size, config.text.max_len),
                          dtype=np.int32)
    return pixels, tokens


def torch_step_fn(model, config):
    opt = config.optimizer
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": opt.weight_decay}, {"params": others, "weight_decay": 0}],
        lr=opt.learning_rate, betas=(opt.b1, opt.b2), fused=True)
    loss_fn = open_clip.ClipLoss()

    def step(images, tokens):
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()
        return loss

    return step


def compare_steps(rounds: int, steps: int, peak: float) -> str:
    config = clip_ti_config()
    model = open_clip_model(config)
    run = bigalign.build(config)
    state = run.init_state()
    torch_state = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    params = params_from_open_clip(torch_state, state.params)
    state = state.replace(params=jax.device_put(params, run.state_sharding.params))
    pixels, tokens = step_inputs(config, np.random.default_rng(0))
    batch = run.global_batch({"image": pixels, "text": tokens})
    # the pixels bigalign's ViT sees, scaled once outside open_clip's timed step
    images_t = torch.from_numpy(np.asarray(normalise_pixels(pixels))).permute(0, 3, 1, 2).contiguous()
    tokens_t = torch.from_numpy(tokens.astype(np.int64))
    torch_step = torch_step_fn(model, config)
    jax_step = run.train_step.lower(state, batch).compile()

    state, metrics = jax_step(state, batch)
    first = {"bigalign": float(metrics["train/loss"]), "open_clip": float(torch_step(images_t, tokens_t))}
    times = {"bigalign": [], "open_clip": []}
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = jax_step(state, batch)
        jax.block_until_ready(state)
        times["bigalign"].append((time.perf_counter() - start) / steps)
        start = time.perf_counter()
        for _ in range(steps):
            torch_step(images_t, tokens_t)
        times["open_clip"].append((time.perf_counter() - start) / steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [[name, f"{median[name] * 1e3:.0f}", f"{min(times[name]) * 1e3:.0f}",
             f"{config.batch_size / median[name]:.1f}",
             f"{median['open_clip'] / median[name]:.2f}x",
             f"{run.flops_per_step / median[name] / peak:.3f}", f"{first[name]:.7f}"]
            for name in ("bigalign", "open_clip")]
    alone, product_flops, count = products_alone(run.train_step, state, batch)
    rows.append([f"bigalign's {count} products alone", f"{alone * 1e3:.0f}", "",
                 f"{config.batch_size / alone:.1f}", f"{median['open_clip'] / alone:.2f}x",
                 f"{run.flops_per_step / alone / peak:.3f}", ""])
    note = (f"first-step losses differ by {abs(first['bigalign'] - first['open_clip']):.1e}; "
            f"{run.flops_per_step / 1e9:.1f} GFLOPs per step ({product_flops / 1e9:.1f} in XLA's "
            f"count of the products timed alone); {rounds} rounds of {steps} steps")
    return note + "\n\n" + markdown_table(
        ["train step", "median ms", "min ms", "samples/s", "samples/s vs open_clip",
         "MFU (f32 peak)", "first loss"], rows)


def loss_fns(name, batch, dim, rng):
    """(bigalign fn, open_clip fn) for one variant, each running forward + backward."""
    x, y = (rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(2))
    x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
    scale, bias = np.float32(10.0), np.float32(-10.0)
    sigmoid = COUNTERPARTS[name] == "SigLipLoss"

    def ours(x, y, scale, bias):
        return losses.compute(name, x, y, scale=scale, bias=bias if sigmoid else None)

    grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))
    jax_args = tuple(jnp.asarray(a) for a in (x, y, scale, bias))
    torch_loss = SigLipLoss() if sigmoid else open_clip.ClipLoss()
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, y, scale, bias)]

    def theirs():
        for leaf in leaves:
            leaf.grad = None
        tx, ty, tscale, tbias = leaves
        value = torch_loss(tx, ty, tscale, tbias) if sigmoid else torch_loss(tx, ty, tscale)
        value.backward()
        return value

    return (lambda: jax.block_until_ready(grads(*jax_args))), theirs


def loss_matmul_rate(batch: int, dim: int) -> float:
    """FLOP/s of the loss's three products timed alone (one each)."""
    rates = [matmul_rate(batch, dim, batch), matmul_rate(batch, batch, dim),
             matmul_rate(batch, batch, dim, transpose_a=True)]
    return 3 / sum(1 / r for r in rates)  # equal FLOPs each: the harmonic mean


def compare_losses(batches, dim: int, rounds: int) -> str:
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        machine = loss_matmul_rate(batch, dim)
        for name in losses.NAMES:
            ours, theirs = loss_fns(name, batch, dim, rng)
            ours(), theirs()  # compile, warm up
            times = {"ours": [], "theirs": []}
            for _ in range(rounds):
                for label, fn in (("ours", ours), ("theirs", theirs)):
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
            ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["theirs"])
            flops = (8 if name in RING_VARIANTS else 6) * batch**2 * dim
            rows.append([str(batch), name, f"{ours_s * 1e3:.0f}", COUNTERPARTS[name],
                         f"{theirs_s * 1e3:.0f}", f"{theirs_s / ours_s:.2f}x",
                         f"{flops / ours_s / 1e9:.1f}", f"{machine / 1e9:.1f}",
                         f"{flops / ours_s / machine:.2f}"])
    return markdown_table(
        ["B", "bigalign loss", "ms", "open_clip loss", "ms", "speed vs open_clip",
         "matmul GFLOP/s", "machine's loss-matmul GFLOP/s", "fraction"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="train steps per round")
    parser.add_argument("--loss-batches", default="2048,8192")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip", choices=("step", "losses"), help="leave one comparison out")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print("$ python tools/bench_vs_openclip.py " + " ".join(sys.argv[1:]))
    peak = matmul_peak(jnp.float32)
    torch_peak = 2 * 2048**3 / best_seconds(
        lambda a, b: a @ b, torch.randn(2048, 2048), torch.randn(2048, 2048), repeats=5)
    print(f"\n{os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}, "
          f"open_clip {open_clip.__version__}; float32 matmul peak (2048^3) measured now: "
          f"jax {peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s\n")
    if args.skip != "step":
        print(compare_steps(args.rounds, args.steps, peak) + "\n")
    if args.skip != "losses":
        batches = [int(b) for b in args.loss_batches.split(",")]
        print(compare_losses(batches, args.dim, args.rounds))


if __name__ == "__main__":
    from bigalign import host_memory

    host_memory.use_huge_pages()  # as the trainer runs (both frameworks share the process)
    main()
