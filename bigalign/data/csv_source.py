"""Image-text pairs listed in a CSV (or TSV) index, in open_clip's convention.

One row per pair: a column with the image path (relative paths are relative to
the CSV's own folder) and a column with the caption. The column names and the
separator are configurable; by default `filepath` and `caption`, separated by a
tab for `.tsv` files and a comma otherwise. The index is read once, up front;
images are read lazily, one per `__getitem__`.
"""

import csv
import os

from bigalign.errors import UserError


def default_separator(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


class CsvSource:
    """Random access to the rows of a CSV index: {"image": absolute path, "caption": str, "origin": path}."""

    def __init__(self, path: str, *, image_column: str = "filepath",
                 text_column: str = "caption", separator: str = ""):
        if not os.path.isfile(path):
            raise UserError(f"CSV index {path!r} does not exist; give the path of an index "
                            f"with columns {image_column!r} and {text_column!r}")
        separator = separator or default_separator(path)
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            missing = [c for c in (image_column, text_column) if c not in columns]
            if missing:
                raise UserError(
                    f"CSV index {path!r} has no column {missing[0]!r} (found {columns}, "
                    f"separator {separator!r}); set data.csv_image_column / "
                    f"data.csv_text_column / data.csv_separator to match it"
                )
            rows = [(row[image_column], row[text_column]) for row in reader]
        if not rows:
            raise UserError(f"CSV index {path!r} lists no images")
        self.path = path
        self._image_paths = [os.path.join(folder, image) for image, _ in rows]
        self._captions = [caption for _, caption in rows]

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, index: int) -> dict:
        image_path = self._image_paths[index]
        return {"image": image_path, "caption": self._captions[index], "origin": image_path}

    def captions(self) -> list[str]:
        """Every caption, in index order (for training a tokenizer)."""
        return list(self._captions)

    def __repr__(self) -> str:
        return f"CsvSource({self.path!r}, {len(self)} rows)"
