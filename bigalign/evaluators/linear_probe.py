"""Linear probes on frozen embeddings: how linearly separable the classes are.

A closed-form ridge regression from embeddings to +-1 one-hot targets, with an
unpenalised intercept (big_vision's few-shot evaluator regresses the same way), fit on
k examples per class of a labelled training split ("{k}shot") and on all of it
("full"), and scored by top-1 accuracy on the labelled test split. The ridge strength
is chosen per fit from L2_REGS by exact leave-one-out accuracy on the training
examples, which costs one eigendecomposition of the [E, E] scatter matrix: no
validation split is carved out, so even 1-shot fits use every example they have.
"""

import numpy as np

from bigalign import evaluators
from bigalign.errors import UserError
from bigalign.schema import Integer, Key, Sequence, Text

L2_REGS = tuple(2.0 ** k for k in range(12, -9, -2))  # strongest first: ties keep the stronger


class RidgeProbe:
    """Ridge regression of targets [n, C] on features [n, E] with an intercept, for any
    ridge strength after one eigendecomposition."""

    def __init__(self, features: np.ndarray, targets: np.ndarray):
        features, targets = features.astype(np.float64), targets.astype(np.float64)
        self.feature_mean, self.target_mean = features.mean(axis=0), targets.mean(axis=0)
        centred = features - self.feature_mean
        self.eigenvalues, self.basis = np.linalg.eigh(centred.T @ centred)  # [E], [E, E]
        self.projected = centred @ self.basis  # [n, E]
        self.correlation = self.projected.T @ (targets - self.target_mean)  # [E, C]
        self.targets = targets

    def weights(self, l2: float) -> np.ndarray:
        """[E, C] minimising ||centred X W - centred Y||^2 + l2 ||W||^2."""
        return self.basis @ (self.correlation / (self.eigenvalues + l2)[:, None])

    def predict(self, features: np.ndarray, l2: float) -> np.ndarray:
        return (features - self.feature_mean) @ self.weights(l2) + self.target_mean

    def leave_one_out(self, l2: float) -> np.ndarray:
        """[n, C]: each training example's prediction by the fit without it (exact)."""
        inverse = 1.0 / (self.eigenvalues + l2)
        fitted = self.projected @ (self.correlation * inverse[:, None]) + self.target_mean
        leverage = 1.0 / len(self.targets) + np.sum(self.projected**2 * inverse, axis=1)
        return (fitted - leverage[:, None] * self.targets) / (1.0 - leverage)[:, None]


def probe_accuracy(train_x, train_labels, test_x, test_labels, num_classes: int) -> float:
    """Top-1 test accuracy of the ridge probe whose strength has the best leave-one-out
    accuracy on the training examples."""
    targets = 2.0 * np.eye(num_classes)[train_labels] - 1.0
    probe = RidgeProbe(train_x, targets)
    if len(train_x) > 1:
        scores = [np.mean(probe.leave_one_out(l2).argmax(axis=1) == train_labels) for l2 in L2_REGS]
        l2 = L2_REGS[int(np.argmax(scores))]
    else:
        l2 = L2_REGS[0]
    return float(np.mean(probe.predict(test_x, l2).argmax(axis=1) == test_labels))


def few_shot_indices(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """`shots` random examples of every class (all of a class with fewer), sorted."""
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


@evaluators.register("linear_probe", options={
    "data": "",  # the labelled test set; "": data.zeroshot_name, or shapes
    "split": "",  # its split; "": data.zeroshot_split
    "train_data": "",  # the labelled training set; "": the test set's source
    "train_split": Key("train", Text(nonempty=True)),
    "num_train": Key(2000, Integer(low=1)),  # training examples read (the first this many)
    "shots": Key((1, 5, 10), Sequence(Integer(low=1))),
})
def linear_probe(context, options) -> dict:
    """`{m}_{k}shot_top1` for every k of `shots` and `{m}_full_top1`, for every non-text
    tower m the labelled sets provide."""
    test = context.classes(options.data, options.split)
    if test is None:
        return {}
    train = context.classes(options.train_data or test.spec, options.train_split,
                            limit=options.num_train)
    if train.class_names != test.class_names:
        raise UserError(f"linear_probe: the training set {train.spec!r} has other class names than "
                        f"the test set {test.spec!r}; give both the same classes (data.class_names)")
    num_classes = len(test.class_names)
    rng = np.random.default_rng(context.config.seed)  # the same shots at every evaluation
    subsets = {shots: few_shot_indices(train.labels, shots, rng) for shots in options.shots}
    results = {}
    for modality, test_x in test.embeddings.items():  # every modality probed on the same examples
        train_x = train.embeddings[modality]
        for shots, chosen in subsets.items():
            results[f"{modality}_{shots}shot_top1"] = probe_accuracy(
                train_x[chosen], train.labels[chosen], test_x, test.labels, num_classes)
        results[f"{modality}_full_top1"] = probe_accuracy(
            train_x, train.labels, test_x, test.labels, num_classes)
    return results
