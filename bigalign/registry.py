"""Registries: the names a config uses to choose a loss, a tower kind, a modality, an
evaluator or a data source, each mapped to the code that implements it.

A new extension is one function or class registered under a new name, in any
module that is imported before the run is built (a config file, a notebook cell,
or a module listed in `config.imports`):

    from bigalign import objectives

    @objectives.LOSSES.register("my_loss")
    def my_loss(outputs, context): ...

and `--config.loss.name=my_loss` selects it. Nothing else needs editing.
"""

from collections.abc import Callable
from typing import Any

from bigalign.errors import UserError


class Registry:
    """Names -> entries of one kind. `what` names the kind in error messages ("loss")."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Registers `entry` under `name`; without `entry`, a decorator that registers its target.

        Registering a name again replaces the entry (so a notebook cell can be re-run).
        """
        if entry is not None:
            self._entries[name] = entry
            return entry

        def decorator(target: Callable) -> Callable:
            self._entries[name] = target
            return target

        return decorator

    def get(self, name: str, key: str = "") -> Any:
        """The entry of `name`; an unknown name is a UserError naming `key` and the valid names."""
        if name not in self._entries:
            problem = f"{key}={name!r} is unknown" if key else f"unknown {self.what} {name!r}"
            raise UserError(f"{problem}; valid: {', '.join(self.names())} "
                            f"(or register a new {self.what})")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
