"""bigalign against open_clip (PyTorch) in one run: the same train step, and the losses alone.

    pip install -e ".[compare]"          # torch and open_clip, for this script only
    python tools/bench_vs_openclip.py [--rounds 5] [--steps 3] [--loss-batches 2048,8192]

Everything runs on this machine's CPU, float32, both frameworks on every core, taking
turns (round-robin), so load from anything else hits both alike. Each framework runs
in a process of its own, as a training job does: this script starts one worker
process for bigalign (jax only) and one for open_clip (torch only) and asks each in
turn to time a round, while the other waits idle. Each round starts with one untimed
call (see `timed`).

Train step: `bench_configs.clip_ti_config()` (ViT-Ti/16 at 112 px, 6-layer text tower,
77 tokens, batch 64) built in both. open_clip's model gets the matching options
(no ln_pre, class-token pooling, LayerNorm eps 1e-6, tanh GELU) and its random initial
weights are copied into bigalign (bigalign/published/open_clip.py), so the first losses
agree: the table prints their difference. open_clip's step is its training loop's:
forward, ClipLoss, backward, global-norm clipping at 1.0, fused AdamW (weight decay on
the matrices, as bigalign's). bigalign's is `Run.train_step`. Per round each takes
`--steps` steps; the table gives the median step time over rounds, samples/s, the
ratio, and MFU: bigalign's count of the step's matmul FLOPs over the time, against
the float32 matmul peak measured in this run (the best of one at the start and one
before each round: a shared machine's rate moves within a run). The last row is the step's matmuls and
convolutions (forward and backward, as its jaxpr has them), each shape timed alone:
the most any removal of the other work could reach, so the MFU that row gives is
the ceiling for this model's shapes on this machine.

Losses: forward + backward (w.r.t. both embeddings and the scale, and the bias for
sigmoid) at each global batch B, D = `--dim`, one device. bigalign's all-gather and
ring variants against open_clip's ClipLoss / SigLipLoss. Against each variant's matmul
FLOPs (6 B^2 D for the all-gather variants: the logits, and their gradient against
each embedding; 8 B^2 D for the ring ones, which recompute the logits), the table
gives its rate and that rate over the machine's: the three [B, D] x [D, B],
[B, B] x [B, D] and [B, B]^T x [B, D] products timed alone, in this run (the best
of one measurement before each round).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_configs import clip_ti_config  # noqa: E402
from bigalign.metrics import markdown_table  # noqa: E402

# bigalign variant -> the open_clip loss it is timed against
COUNTERPARTS = {"softmax": "ClipLoss", "softmax_tiled": "ClipLoss", "sigmoid": "SigLipLoss",
                "sigmoid_chunked": "SigLipLoss"}
RING_VARIANTS = ("softmax_tiled", "sigmoid_chunked")


def step_inputs(config):
    """uint8 images and full-length token ids (no padding, so both pool the last token)."""
    rng = np.random.default_rng(0)
    size = config.data.image_size
    pixels = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(1, config.text.vocab_size, (config.batch_size, config.text.max_len),
                          dtype=np.int32)
    return pixels, tokens


def loss_inputs(batch: int, dim: int):
    """Unit-norm [B, D] embeddings x and y, the scale and the bias; the same in both workers."""
    rng = np.random.default_rng(batch)
    x, y = (rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(2))
    x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
    return x, y, np.float32(10.0), np.float32(-10.0)


def timed(fn, n: int) -> float:
    """Seconds per call of `fn` (which waits for its own result) over n calls, after one
    untimed call: the first after the other worker's turn pays to fault back in the
    memory the OS took meanwhile (0.5-2 s here for either framework), which a training
    job, one framework running alone, never does."""
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


class Worker:
    """The calls both workers answer alike, once set up: `step` (one train step) and
    `loss` (one forward and backward pass), each waiting for its own result."""

    def steps(self, n: int) -> float:
        return timed(self.step, n)

    def run_loss(self) -> float:
        return timed(self.loss, 1)


class OpenClipWorker(Worker):
    """The open_clip side: its process runs torch, and never starts a jax backend."""

    def __init__(self):
        global open_clip, torch
        try:
            import open_clip
            import torch
        except ImportError:
            sys.exit("tools/bench_vs_openclip.py needs torch and open_clip: "
                     "pip install -e '.[compare]'")
        torch.set_num_threads(os.cpu_count())
        self.config = clip_ti_config()

    def versions(self) -> str:
        return f"torch {torch.__version__}, open_clip {open_clip.__version__}"

    def peak(self) -> float:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        return 2 * 2048**3 / min(timed(lambda: a @ b, 1) for _ in range(5))

    def init_model(self, weights_path: str) -> None:
        """Builds open_clip's CLIP with bigalign's architecture; saves its weights."""
        from bigalign.models.sizes import parse_variant

        config = self.config
        image, text = config.model.image, config.model.text
        dims, patch = parse_variant(image.variant)
        common = dict(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})
        vision_cfg = dict(image_size=config.data.image_size, patch_size=patch, width=dims["width"],
                          layers=dims["depth"], head_width=dims["width"] // dims["num_heads"],
                          mlp_ratio=dims["mlp_dim"] / dims["width"], no_ln_pre=True,
                          pool_type="tok", **common)
        text_cfg = dict(context_length=config.text.max_len, vocab_size=config.text.vocab_size,
                        width=text.width, heads=text.num_heads, layers=text.depth,
                        mlp_ratio=text.mlp_dim / text.width, pool_type="last", **common)
        torch.manual_seed(0)
        self.model = open_clip.model.CLIP(config.model.embed_dim, vision_cfg, text_cfg)
        np.savez(weights_path, **{name: value.detach().numpy()
                                  for name, value in self.model.state_dict().items()})

    def setup_step(self, pixels_path: str) -> float:
        """Its training loop's step on the pixels bigalign's ViT sees; the first loss."""
        opt = self.config.optimizer
        model = self.model
        decayed = [p for p in model.parameters() if p.ndim >= 2]
        others = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": opt.weight_decay},
             {"params": others, "weight_decay": 0}],
            lr=opt.learning_rate, betas=(opt.b1, opt.b2), fused=True)
        loss_fn = open_clip.ClipLoss()
        images = torch.from_numpy(np.load(pixels_path)).permute(0, 3, 1, 2).contiguous()
        tokens = torch.from_numpy(step_inputs(self.config)[1].astype(np.int64))

        def step():
            optimizer.zero_grad(set_to_none=True)
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
            optimizer.step()
            return loss

        self.step = step
        return float(step().detach())

    def setup_loss(self, name: str, batch: int, dim: int) -> None:
        from open_clip.loss import SigLipLoss

        sigmoid = COUNTERPARTS[name] == "SigLipLoss"
        loss = SigLipLoss() if sigmoid else open_clip.ClipLoss()
        leaves = [torch.tensor(a, requires_grad=True) for a in loss_inputs(batch, dim)]

        def forward_backward():
            for leaf in leaves:
                leaf.grad = None
            x, y, scale, bias = leaves
            (loss(x, y, scale, bias) if sigmoid else loss(x, y, scale)).backward()

        self.loss = forward_backward
        forward_backward()


class BigalignWorker(Worker):
    """The bigalign side: its process runs jax, and never imports torch."""

    def __init__(self):
        global bigalign, jax, jnp, losses, machine_peak
        import jax
        import jax.numpy as jnp

        import bigalign
        import machine_peak
        from bigalign import losses

        self.config = clip_ti_config()

    def versions(self) -> str:
        return f"jax {jax.__version__}"

    def peak(self) -> float:
        return machine_peak.matmul_peak(jnp.float32)

    def setup_step(self, weights_path: str, pixels_path: str) -> dict:
        """`Run.train_step` from open_clip's initial weights, compiled; saves the pixels
        its ViT sees (for open_clip's step); the first loss and the step's FLOPs."""
        from bigalign.models.vit import normalise_pixels
        from bigalign.published.open_clip import params_from_open_clip

        run = bigalign.build(self.config)
        state = run.init_state()
        with np.load(weights_path) as weights:
            params = params_from_open_clip(dict(weights), state.params)
        state = state.replace(params=jax.device_put(params, run.state_sharding.params))
        pixels, tokens = step_inputs(self.config)
        np.save(pixels_path, np.asarray(normalise_pixels(pixels)))
        batch = run.global_batch({"image": pixels, "text": tokens})
        step = run.train_step.lower(state, batch).compile()
        self.state, metrics = step(state, batch)
        self.run, self.batch, self.compiled = run, batch, step
        return {"loss": float(metrics["train/loss"]), "flops": run.flops_per_step}

    def step(self) -> None:
        self.state, _ = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)

    def products_alone(self) -> dict:
        seconds, flops, count = machine_peak.products_alone(self.run.train_step, self.state,
                                                            self.batch)
        return {"seconds": seconds, "flops": flops, "count": count}

    def loss_matmul_rate(self, batch: int, dim: int) -> float:
        """FLOP/s of the loss's three products timed alone (one each)."""
        rate = machine_peak.matmul_rate
        rates = [rate(batch, dim, batch, repeats=3), rate(batch, batch, dim, repeats=3),
                 rate(batch, batch, dim, transpose_a=True, repeats=3)]
        return 3 / sum(1 / r for r in rates)  # equal FLOPs each: the harmonic mean

    def setup_loss(self, name: str, batch: int, dim: int) -> None:
        sigmoid = COUNTERPARTS[name] == "SigLipLoss"

        def loss(x, y, scale, bias):
            return losses.compute(name, x, y, scale=scale, bias=bias if sigmoid else None)

        grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        args = tuple(jnp.asarray(a) for a in loss_inputs(batch, dim))
        self.loss = lambda: jax.block_until_ready(grads(*args))
        self.loss()


WORKERS = {"bigalign": BigalignWorker, "open_clip": OpenClipWorker}


def serve(name: str) -> None:
    """A worker's loop: one JSON call per stdin line -> one JSON result per stdout line."""
    worker = WORKERS[name]()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else the libraries print goes to stderr
    for line in sys.stdin:
        method, args = json.loads(line)
        print(json.dumps(getattr(worker, method)(*args)), file=answers, flush=True)


class Remote:
    """A worker process, called as `remote.method(*args)`; it waits idle between calls."""

    def __init__(self, name: str):
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __getattr__(self, method):
        def call(*args):
            print(json.dumps([method, list(args)]), file=self.process.stdin, flush=True)
            answer = self.process.stdout.readline()
            if not answer:
                sys.exit(f"the {self.name} worker stopped (exit {self.process.wait()}); "
                         "its error is above")
            return json.loads(answer)
        return call


def alternate(calls, rounds: int) -> list[list]:
    """Each callable's result per round, called in turn: calls[0], calls[1], ..., calls[0], ..."""
    results = [[] for _ in calls]
    for _ in range(rounds):
        for call, result in zip(calls, results):
            result.append(call())
    return results


def compare_steps(jax_worker, torch_worker, rounds: int, steps: int, peak: float) -> str:
    """The step table; MFU is against the best float32 peak of `peak` and one measured
    before each of bigalign's rounds (a shared machine's rate moves within a run)."""
    config = clip_ti_config()
    with tempfile.TemporaryDirectory() as tmp:
        weights, pixels = os.path.join(tmp, "weights.npz"), os.path.join(tmp, "pixels.npy")
        torch_worker.init_model(weights)
        ours = jax_worker.setup_step(weights, pixels)
        first = {"bigalign": ours["loss"], "open_clip": torch_worker.setup_step(pixels)}
    flops = ours["flops"]
    peaks, *both = alternate([jax_worker.peak, lambda: jax_worker.steps(steps),
                              lambda: torch_worker.steps(steps)], rounds)
    times = dict(zip(("bigalign", "open_clip"), both))
    peak = max(peak, *peaks)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [[name, f"{median[name] * 1e3:.0f}", f"{min(times[name]) * 1e3:.0f}",
             f"{config.batch_size / median[name]:.1f}",
             f"{median['open_clip'] / median[name]:.2f}x",
             f"{flops / median[name] / peak:.3f}", f"{first[name]:.7f}"]
            for name in ("bigalign", "open_clip")]
    alone = jax_worker.products_alone()
    rows.append([f"bigalign's {alone['count']} products alone", f"{alone['seconds'] * 1e3:.0f}",
                 "", f"{config.batch_size / alone['seconds']:.1f}",
                 f"{median['open_clip'] / alone['seconds']:.2f}x",
                 f"{flops / alone['seconds'] / peak:.3f}", ""])
    note = (f"first-step losses differ by {abs(first['bigalign'] - first['open_clip']):.1e}; "
            f"{flops / 1e9:.1f} GFLOPs per step ({alone['flops'] / 1e9:.1f} in XLA's "
            f"count of the products timed alone); {rounds} rounds of {steps} steps; MFU "
            f"against the best float32 peak of the rounds, {peak / 1e9:.1f} GFLOP/s")
    return note + "\n\n" + markdown_table(
        ["train step", "median ms", "min ms", "samples/s", "samples/s vs open_clip",
         "MFU (f32 peak)", "first loss"], rows)


def compare_losses(jax_worker, torch_worker, batches, dim: int, rounds: int) -> str:
    """The losses table; each fraction is against the best of the machine's loss-matmul
    rates measured at that B, one before each of bigalign's rounds of every variant."""
    rows = []
    for batch in batches:
        medians, rates = {}, []
        for name in COUNTERPARTS:
            jax_worker.setup_loss(name, batch, dim)
            torch_worker.setup_loss(name, batch, dim)
            measured, *both = alternate([lambda: jax_worker.loss_matmul_rate(batch, dim),
                                         jax_worker.run_loss, torch_worker.run_loss], rounds)
            rates += measured
            medians[name] = [statistics.median(times) for times in both]
        machine = max(rates)
        for name, (ours, theirs) in medians.items():
            flops = (8 if name in RING_VARIANTS else 6) * batch**2 * dim
            rows.append([str(batch), name, f"{ours * 1e3:.0f}", COUNTERPARTS[name],
                         f"{theirs * 1e3:.0f}", f"{theirs / ours:.2f}x",
                         f"{flops / ours / 1e9:.1f}", f"{machine / 1e9:.1f}",
                         f"{flops / ours / machine:.2f}"])
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
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(args.worker)
    print("$ python tools/bench_vs_openclip.py " + " ".join(sys.argv[1:]))
    jax_worker, torch_worker = Remote("bigalign"), Remote("open_clip")
    peak, torch_peak = jax_worker.peak(), torch_worker.peak()
    print(f"\n{os.cpu_count()} cores, {jax_worker.versions()}, {torch_worker.versions()}, "
          f"one process each; float32 matmul peak (2048^3) measured now: "
          f"jax {peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s\n")
    if args.skip != "step":
        print(compare_steps(jax_worker, torch_worker, args.rounds, args.steps, peak) + "\n")
    if args.skip != "losses":
        batches = [int(b) for b in args.loss_batches.split(",")]
        print(compare_losses(jax_worker, torch_worker, batches, args.dim, args.rounds))


if __name__ == "__main__":
    from bigalign import host_memory

    host_memory.use_huge_pages()  # as the trainer runs; the workers inherit it
    main()
