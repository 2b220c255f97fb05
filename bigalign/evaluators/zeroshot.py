"""Zero-shot classification (Radford et al. 2021): a class is the normalised mean of its
prompts' text embeddings (prompt ensembling); an example is assigned the classes most
similar to its embedding. Top-1 and top-5 accuracy for every non-text tower."""

import numpy as np

from bigalign import evaluators
from bigalign.data import held_out
from bigalign.evaluators import ranking


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_embeddings(prompt_embeddings: np.ndarray) -> np.ndarray:
    """[C, P, E] unit prompt embeddings -> [C, E]: each class's normalised mean prompt."""
    return normalise(prompt_embeddings.mean(axis=1))


def top_k_accuracy(ranked: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among their first k ranked classes ([N, >=k])."""
    return float(np.mean((ranked[:, :k] == labels[:, None]).any(axis=1)))


@evaluators.register("zeroshot", options={
    # A labelled source ("tfds:cifar10", "csv:PATH"); "": data.zeroshot_name, or shapes.
    "data": "",
    "split": "",  # "": data.zeroshot_split
})
def zeroshot(context, options) -> dict:
    """`{m}_top1`, `{m}_top5` for every non-text tower m the labelled set provides."""
    if "text" not in context.modalities:
        return {}
    labelled = context.classes(options.data, options.split)
    if labelled is None:
        return {}
    prompts = held_out.class_texts(context.config.data, labelled.spec, labelled.class_names)
    tokens = context.run.tokenizer.encode([p for group in prompts for p in group],
                                          context.config.text.max_len)
    embedded = context.embed("text", tokens).reshape(len(prompts), len(prompts[0]), -1)
    classes = class_embeddings(embedded)
    results = {}
    for modality, embeddings in labelled.embeddings.items():
        ranked = ranking.top_k(embeddings, classes, 5, context.mesh)
        results[f"{modality}_top1"] = top_k_accuracy(ranked, labelled.labels, 1)
        results[f"{modality}_top5"] = top_k_accuracy(ranked, labelled.labels, 5)
    return results
