"""Any prepared tfds dataset as a random-access source, through `tfds.data_source` (no TensorFlow).

Features are named by key; a nested feature by a path with slashes
("captions/text" in coco_captions). The text feature may be:
- a text: the caption;
- a sequence of texts (several captions per image): all of them (training draws one
  at random per visit, evaluation takes the first);
- a ClassLabel (classification datasets such as cifar10): the class-name prompts
  ("a photo of a {}.") of the example's class, so a labelled dataset trains as pairs.
The dataset must have been prepared in a random-access format, once, where there is
network: `tfds build NAME --file_format=array_record [--data_dir DIR]`.
"""

import numpy as np
import tensorflow_datasets as tfds

from bigalign.errors import UserError


def _feature(features, path: str):
    """The tfds feature at a slash-separated path, or None."""
    for part in path.split("/"):
        inner = getattr(features, "feature", features)  # Sequence(FeaturesDict(...))
        try:
            features = inner[part]
        except (KeyError, TypeError):
            return None
    return features


def _value(example: dict, path: str):
    for part in path.split("/"):
        example = example[part]
    return example


def _texts(value) -> list[str]:
    """A text feature's value (str, bytes or an array of them) as a list of str."""
    values = value.tolist() if isinstance(value, np.ndarray) else value
    if isinstance(values, (str, bytes)):
        values = [values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def open_data_source(name: str, split: str, data_dir: str):
    """`tfds.data_source(name, split)`, with one-line errors for the usual setup mistakes."""
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"tfds has no dataset {name!r}; check data.name ('tfds:NAME', NAME as in "
                        f"the tfds catalog, optionally NAME/CONFIG:VERSION)") from None
    except Exception as error:  # tfds raises many types for an unprepared dataset
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"cannot open tfds dataset {name!r} split {split!r} in {where}: {reason}; prepare "
            f"it once with `tfds build {name} --file_format=array_record` (data.tfds_data_dir "
            f"sets the folder) and check the split name"
        ) from None


class TfdsSource:
    """Examples {"image": uint8 [H, W, 3], "caption": [str, ...], "label": int, "origin": str}.

    "caption" is present when `text_key` is set, "label" when `label_key` is.
    """

    def __init__(self, name: str, split: str, *, data_dir: str = "", image_key: str = "image",
                 text_key: str = "caption", label_key: str = "", prompts=("a photo of a {}.",),
                 class_names=()):
        self.name, self.split = name, split
        self._source = open_data_source(name, split, data_dir)
        features = self._source.dataset_info.features
        self._keys = {"image": image_key, "text": text_key, "label": label_key}
        for role, key in self._keys.items():
            if key and _feature(features, key) is None:
                raise UserError(
                    f"tfds dataset {name!r} has no feature {key!r} for the {role}s; set "
                    f"data.{role}_key to one of {sorted(features.keys())} (nested: 'a/b')"
                )
        label_feature = _feature(features, label_key or text_key)
        self.class_names = list(class_names) or list(getattr(label_feature, "names", []))
        # A ClassLabel text feature: captions are the prompts with the class name.
        self._text_from_label = isinstance(_feature(features, text_key), tfds.features.ClassLabel)
        self._prompts = tuple(prompts)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        item = {"image": np.asarray(_value(example, self._keys["image"])),
                "origin": f"tfds:{self.name}[{self.split}]#{index}"}
        if self._keys["text"]:
            value = _value(example, self._keys["text"])
            item["caption"] = (
                [p.format(self.class_names[int(value)]) for p in self._prompts]
                if self._text_from_label else _texts(value)
            )
        if self._keys["label"]:
            item["label"] = int(_value(example, self._keys["label"]))
        return item

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"
