"""Skipping unreadable examples: counted, bounded by a fraction, and part of the checkpointed state.

Web-scale image folders always hold a few broken files. An example whose source
or decoder reported an "error" (see sources.py) is dropped from the stream;
each kept example records how many were dropped just before it ("skipped"),
so a batch knows how many examples its assembly skipped, whichever worker
process built it. When more than `max_fraction` of the examples read so far
were dropped, the stream stops with a one-line error naming the last bad file.
The fraction is judged once JUDGE_AFTER / max_fraction examples were read (at
the limit, about JUDGE_AFTER bad ones): earlier, a couple of bad files that
happen to come first, or to land in one worker's share, would look like a high rate.
"""

import math

import grain

from bigalign.errors import UserError

SKIPPED = "skipped"  # per-example key: unreadable examples dropped just before this one
JUDGE_AFTER = 10  # bad examples expected at the limit before the fraction is judged


class UnreadableExample(Exception):
    """A decoder's error for one bad file or record; its message says what is wrong with it."""


class SkipCounter:
    """Counts read and dropped examples; raises UserError once too many were dropped."""

    def __init__(self, max_fraction: float, seen: int = 0, skipped: int = 0):
        if not 0 <= max_fraction <= 1:
            raise UserError(f"data.max_skipped_fraction={max_fraction} must be in [0, 1]")
        self.max_fraction = max_fraction
        self.seen, self.skipped = seen, skipped
        self._min_seen = math.ceil(JUDGE_AFTER / max_fraction) if max_fraction > 0 else 1

    def is_bad(self, example: dict) -> bool:
        """Records `example`; True if it must be dropped. Raises when the fraction is exceeded."""
        self.seen += 1
        if "error" not in example:
            return False
        self.skipped += 1
        if self.seen >= self._min_seen and self.skipped > self.max_fraction * self.seen:
            raise UserError(
                f"{self.skipped} of {self.seen} examples read were unreadable, more than "
                f"data.max_skipped_fraction={self.max_fraction}; the last: {example['origin']} "
                f"({example['error']}); fix or remove such files, or raise the fraction"
            )
        return True


class _SkipIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_fraction: float):
        super().__init__(parent)
        self._counter = SkipCounter(max_fraction)

    def __next__(self) -> dict:
        dropped = 0
        while True:
            example = next(self._parent)
            if not self._counter.is_bad(example):
                return {**example, SKIPPED: dropped}
            dropped += 1

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "seen": self._counter.seen,
                "skipped": self._counter.skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._counter = SkipCounter(self._counter.max_fraction, state["seen"], state["skipped"])


class SkipUnreadable(grain.IterDataset):
    """Drops examples with an "error" key from `parent` (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, max_fraction: float):
        super().__init__(parent)
        self._max_fraction = max_fraction

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipIterator(self._parent.__iter__(), self._max_fraction)
