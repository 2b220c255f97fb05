"""bigalign: large-batch multimodal contrastive pretraining in JAX/Flax.

    run = bigalign.build(config, workdir)   # everything a run needs (builder.py)
    model = bigalign.load(workdir)          # a trained model: embed_image, embed_text, ...

The names below, and submodules such as `bigalign.losses`, load on first use: so
`import bigalign` does not load jax, and the command-line entry points can restart
themselves with the allocator settings of host_memory.py before it does.
"""

import importlib

_EXPORTS = {"Model": "bigalign.api", "load": "bigalign.api", "Run": "bigalign.builder",
            "build": "bigalign.builder"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise  # the submodule exists; something it imports does not
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted([*globals(), *__all__])
