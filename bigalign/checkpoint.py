"""Checkpoints of the whole run: train state and the data iterator's position, together.

Built on orbax's `CheckpointManager`: saves are asynchronous (training goes on
while arrays are written) and atomic (written to a temporary directory, renamed
when complete, so a crash mid-save leaves the previous checkpoint usable).
The grain iterator state is saved beside the train state, so a resumed run sees
exactly the examples an uninterrupted run would have seen.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp

from bigalign.errors import UserError


class Checkpointer:
    """Saves and restores (train state, data iterator) pairs under `directory`/<step>."""

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True
        )
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iterator) -> None:
        """Starts an async save of `state` and the iterator's current position."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
        )

    def restore(self, step: int, state_like, data_iterator):
        """Returns the train state saved at `step`, laid out like `state_like`.

        `data_iterator` is moved, in place, to where it was when the checkpoint
        was written. Raises UserError if the checkpoint holds another model.
        """
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except (ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UserError(
                f"checkpoint {self._manager.directory}/{step} does not match this model/config "
                f"({type(error).__name__}: {first_line[:200]}); use a new --workdir"
            ) from error
        return restored.state

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
