"""Memory per device of a train step at pod scale, compiled on simulated CPU devices.

Why: choosing the global batch, the mesh (data, fsdp), the loss variant and GradCache
for a pod needs the memory one device would use, before renting the pod. What: for
each plan, the SigLIP recipe (configs/siglip_b16.py: bf16, scanned blocks, remat
"dots_no_batch", 64 text tokens, 32k vocabulary) with the plan's image size variant,
global batch, mesh and loss, its train step lowered on abstract inputs (nothing is
allocated) and compiled for `--devices` simulated CPU devices; XLA's memory analysis
of the per-device program gives the arguments (the train state's shard and the batch
shard), the outputs and the temporaries (activations kept for the backward pass,
gathered weights, gradients, logits). The sum is what one device needs, before
allocator fragmentation. XLA:CPU schedules and fuses differently from TPU and GPU
backends, so treat the numbers as estimates within tens of percent. Beside it, the
analytic plan of bigalign/plan.py (`python -m bigalign.plan` plans without compiling).

    python tools/plan_memory.py                    # the plans of docs/scaling.md
    python tools/plan_memory.py --plans B/16:32768:32x8:sigmoid_chunked:1

A plan is VARIANT:GLOBAL_BATCH:DATAxFSDP:LOSS:GRAD_CACHE_CHUNKS; the devices simulated
are the largest data x fsdp of the plans.
"""

import argparse
import os
import sys
import time

PLANS = (
    "B/16:32768:32x8:sigmoid_chunked:1",
    "B/16:32768:32x8:sigmoid:1",
    "B/16:262144:128x8:sigmoid_chunked:1",
    "B/16:262144:128x8:sigmoid:1",
    "B/16:262144:128x8:sigmoid_chunked:4",
    "So400m/14:32768:32x8:sigmoid_chunked:1",
    "So400m/14:32768:32x8:sigmoid_chunked:4",
    "So400m/14:262144:128x8:sigmoid_chunked:4",
    "So400m/14:262144:128x8:sigmoid_chunked:8",
)


def parse_plan(plan: str) -> dict:
    variant, batch, mesh, loss, chunks = plan.split(":")
    data, fsdp = (int(n) for n in mesh.split("x"))
    return dict(variant=variant, batch_size=int(batch), data=data, fsdp=fsdp, loss=loss,
                num_chunks=int(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--compute-dtype", default="bfloat16",
                        help="float32 compares the plan with XLA:CPU, which runs bf16 matmuls in f32")
    args = parser.parse_args()
    plans = [parse_plan(p) for p in args.plans.split(",")]
    devices = max(p["data"] * p["fsdp"] for p in plans)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs"))
    import jax
    import siglip_b16

    import bigalign
    from bigalign import plan as planner
    from bigalign.metrics import markdown_table
    from bigalign.models.sizes import parse_variant

    print("$ python tools/plan_memory.py " + " ".join(sys.argv[1:]), flush=True)
    rows = []
    for plan in plans:
        config = siglip_b16.get_config()
        config.batch_size = plan["batch_size"]
        config.data.name = "shapes"  # only the input shapes matter: no data is read
        config.data.update(image_size=args.image_size, zeroshot_name="")
        config.model.compute_dtype = args.compute_dtype
        config.mesh.update(data=plan["data"], fsdp=plan["fsdp"])
        config.loss.name = plan["loss"]
        config.grad_cache.num_chunks = plan["num_chunks"]
        config.model.image.variant = plan["variant"]
        config.model.text.variant = plan["variant"].partition("/")[0]
        # The recipe's image tower has no head (as the released SigLIPs): the embedding
        # is as wide as the variant (So400m: 1152, as SigLIP So400m/14's).
        config.model.embed_dim = parse_variant(plan["variant"])[0]["width"]
        run = bigalign.build(config)
        start = time.perf_counter()
        memory = planner.compiled_memory(run)
        seconds = time.perf_counter() - start
        planned = planner.plan(config, plan["data"] * plan["fsdp"]).total
        gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
        params = sum(x.size for x in jax.tree.leaves(run.abstract_state().params))
        rows.append([plan["variant"], f"{params / 1e6:.0f}M", f"{config.batch_size:,}",
                     f"{plan['data']}x{plan['fsdp']}", f"{config.batch_size // (plan['data'] * plan['fsdp'])}",
                     plan["loss"], str(plan["num_chunks"]), gib(memory.arguments),
                     gib(memory.temporaries), gib(memory.total), gib(planned),
                     f"{planned / memory.total:.2f}", f"{seconds:.0f}"])
        print(f"compiled {plan} in {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{devices} simulated CPU devices, jax {jax.__version__}, image {args.image_size} px, "
          f"{args.compute_dtype}, configs/siglip_b16.py otherwise (scan, remat dots_no_batch, 64 tokens, "
          f"32k vocab)\n")
    print(markdown_table(
        ["image", "params", "global batch", "mesh data x fsdp", "per device", "loss",
         "GradCache chunks", "arguments GiB", "temporaries GiB", "total GiB per device",
         "planned GiB", "planned / compiled", "compile s"], rows))


if __name__ == "__main__":
    main()
