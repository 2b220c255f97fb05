"""Image-text (or audio-text) pairs listed in a CSV (or TSV) index, in open_clip's convention.

One row per pair: a column with the image path (relative paths are relative to
the CSV's own folder) and a column with the caption; for sound, a column with a
WAV path, instead of or besides the image. The column names and the separator
are configurable; by default `filepath` and `caption`, separated by a tab for
`.tsv` files and a comma otherwise. The index is read once, up front; files are
read lazily, one example per `__getitem__`.
"""

import csv
import os

from bigalign.errors import UserError


def default_separator(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


class CsvSource:
    """Random access to the rows of a CSV index.

    Items: {"image": absolute path (with an image column), "audio": absolute path (with
    an audio column), "caption": str, "origin": the first of those paths}.
    """

    def __init__(self, path: str, *, image_column: str = "filepath",
                 text_column: str = "caption", audio_column: str = "", separator: str = ""):
        wanted = {"image": image_column, "audio": audio_column}
        self.file_columns = {modality: column for modality, column in wanted.items() if column}
        if not self.file_columns:
            raise UserError("a CSV index needs an image or an audio column; set "
                            "data.csv_image_column or data.csv_audio_column")
        if not os.path.isfile(path):
            problem = "is a directory" if os.path.isdir(path) else "does not exist"
            raise UserError(f"CSV index {path!r} {problem}; give the path of an index file "
                            f"with columns {[*self.file_columns.values(), text_column]}")
        separator = separator or default_separator(path)
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            missing = [c for c in (*self.file_columns.values(), text_column) if c not in columns]
            if missing:
                raise UserError(
                    f"CSV index {path!r} has no column {missing[0]!r} (found {columns}, "
                    f"separator {separator!r}); set data.csv_image_column / csv_audio_column / "
                    f"csv_text_column / csv_separator to match it"
                )
            rows = list(reader)
        if not rows:
            raise UserError(f"CSV index {path!r} lists no examples")
        self.path = path
        self._files = {
            modality: [os.path.join(folder, row[column]) for row in rows]
            for modality, column in self.file_columns.items()
        }
        self._captions = [row[text_column] for row in rows]

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, index: int) -> dict:
        files = {modality: paths[index] for modality, paths in self._files.items()}
        return {**files, "caption": self._captions[index], "origin": next(iter(files.values()))}

    def captions(self) -> list[str]:
        """Every caption, in index order (for training a tokenizer)."""
        return list(self._captions)

    def __repr__(self) -> str:
        return f"CsvSource({self.path!r}, {len(self)} rows)"
