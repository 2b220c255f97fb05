"""Image-text (or audio-text) pairs listed in a CSV (or TSV) index, in open_clip's convention,
or labelled images (or sounds) for zero-shot classification.

One row per example: a column with the image path (relative paths are relative to
the CSV's own folder) and a column with the caption; for sound, a column with a
WAV path, instead of or besides the image. Opened for zero-shot classification, a
label column takes the caption's place: each cell a class name of `class_names`
(data.class_names, whose line order gives the class ids) or else an integer class id.
The column names and the separator are configurable; by default `filepath`,
`caption` and `label`, separated by a tab for `.tsv` files and a comma otherwise.
The index is read once, up front, every label checked then (a bad one stops the run
before training); files are read lazily, one example per `__getitem__`.
"""

import csv
import os

from bigalign.errors import UserError


def default_separator(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


def _class_ids(path: str, column: str, cells, class_names: list[str]) -> list[int]:
    """The class id of each (line number, cell) of the label column of the CSV at `path`.

    A cell is a class name (looked up first) or an integer id 0..C-1; the first
    empty, unknown or out-of-range cell is a UserError naming its line.
    """
    ids = {name: i for i, name in enumerate(class_names)}
    count = len(class_names)
    result = []
    for line, cell in cells:
        value = (cell or "").strip()  # None: a row with fewer cells than the header
        where = f"CSV index {path!r} line {line}"
        if not value:
            raise UserError(f"{where} has an empty {column!r} cell; give each row a class name "
                            f"of data.class_names or a class id 0..{count - 1}")
        if value in ids:
            result.append(ids[value])
        elif not value.isdecimal():
            raise UserError(f"{where}: label {value!r} is neither one of the {count} class names "
                            f"of data.class_names nor a class id; fix the cell or add the class "
                            f"to that file")
        elif int(value) >= count:
            raise UserError(f"{where}: class id {value} is out of range for the {count} class "
                            f"names of data.class_names (ids 0..{count - 1}); fix the cell or "
                            f"list every class in that file")
        else:
            result.append(int(value))
    return result


class CsvSource:
    """Random access to the rows of a CSV index.

    Items: {"image": absolute path (with an image column), "audio": absolute path (with
    an audio column), "caption": str (with a text column), "label": int class id (with a
    label column, which needs `class_names`), "origin": the first of those paths}.
    """

    def __init__(self, path: str, *, image_column: str = "filepath",
                 text_column: str = "caption", audio_column: str = "", label_column: str = "",
                 class_names=(), separator: str = ""):
        wanted = {"image": image_column, "audio": audio_column}
        self.file_columns = {modality: column for modality, column in wanted.items() if column}
        if not self.file_columns:
            raise UserError("a CSV index needs an image or an audio column; set "
                            "data.csv_image_column or data.csv_audio_column")
        if label_column and not class_names:
            raise UserError(f"zero-shot on CSV index {path!r} needs class names for its prompts; "
                            f"list them in a data.class_names file, one per line (line order = "
                            f"class ids)")
        needed = [c for c in (*self.file_columns.values(), text_column, label_column) if c]
        if not os.path.isfile(path):
            problem = "is a directory" if os.path.isdir(path) else "does not exist"
            raise UserError(f"CSV index {path!r} {problem}; give the path of an index file "
                            f"with columns {needed}")
        separator = separator or default_separator(path)
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            missing = [c for c in needed if c not in columns]
            if missing:
                raise UserError(
                    f"CSV index {path!r} has no column {missing[0]!r} (found {columns}, "
                    f"separator {separator!r}); set data.csv_image_column / csv_audio_column / "
                    f"csv_text_column / csv_label_column / csv_separator to match it"
                )
            rows, lines = [], []
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)  # the line the row ends on
        if not rows:
            raise UserError(f"CSV index {path!r} lists no examples")
        self.path, self._count = path, len(rows)
        self.class_names = list(class_names)
        self._fields = {
            modality: [os.path.join(folder, row[column]) for row in rows]
            for modality, column in self.file_columns.items()
        }
        if text_column:
            self._fields["caption"] = [row[text_column] for row in rows]
        if label_column:
            cells = [(line, row[label_column]) for line, row in zip(lines, rows)]
            self._fields["label"] = _class_ids(path, label_column, cells, self.class_names)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self._fields.items()}
        return {**item, "origin": item[next(iter(self.file_columns))]}

    def captions(self) -> list[str]:
        """Every caption, in index order (for training a tokenizer); none without a text column."""
        return list(self._fields.get("caption", []))

    def __repr__(self) -> str:
        return f"CsvSource({self.path!r}, {len(self)} rows)"
