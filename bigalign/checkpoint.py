"""Checkpoints of the whole run: train state and the data iterator's position, together.

Built on orbax's `CheckpointManager`: saves are asynchronous (training goes on
while arrays are written) and atomic (written to a temporary directory, renamed
when complete, so a crash mid-save leaves the previous checkpoint usable).
The grain iterator state is saved beside the train state, so a resumed run sees
exactly the examples an uninterrupted run would have seen.

With several processes every one saves and restores (orbax's protocol: process 0
makes the directories, each writes its shards, and each its own data position,
`data/process_I-of-N.json`). A run resumed on another number of processes restores
the state and starts the data at the checkpoint's step in the global order
(`restore` says whether the saved position fitted).
"""

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from bigalign import workdir as workdir_lib
from bigalign.errors import UserError


class Checkpointer:
    """Saves and restores (train state, data iterator) pairs under `directory`/<step>."""

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True
        )
        self._manager = ocp.CheckpointManager(
            workdir_lib.path(directory),
            options=options,
            item_names=("state", "data"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
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

    def save_parameters(self, params) -> None:
        """Saves step 0 as parameters only: a run's starting point (an imported model),
        which `load_params`, `load_initial_params` and a run started in this workdir read."""
        self._manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))

    def restore(self, step: int, state_like, data_iterator) -> tuple:
        """(the train state saved at `step`, laid out like `state_like`; whether the data
        position was restored).

        `data_iterator` is moved, in place, to where it was when the checkpoint was
        written, if it was written by as many processes as this run has (else it is left
        as it is). Raises UserError if the checkpoint holds another model.
        """
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        self._check_compatible(step, abstract_state)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        if self.data_processes(step) != jax.process_count():
            return restored.state, False
        try:
            self._manager.restore(
                step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
            )
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise UserError(
                f"the data position in checkpoint {self._manager.directory}/{step} does not fit "
                f"this input pipeline ({type(error).__name__}: {error}); it was saved with other "
                f"data settings (data.name, data.num_workers, batch_size) or another bigalign "
                f"version: resume with those, or use a new --workdir"
            ) from None
        return restored.state, True

    def data_processes(self, step: int) -> int | None:
        """How many processes saved the data position of checkpoint `step` (None: none)."""
        names = [p.name for p in (self._manager.directory / str(step) / "data").glob("process_*-of-*.json")]
        return int(names[0].rsplit("-of-", 1)[1].removesuffix(".json")) if names else None

    def _check_compatible(self, step: int, abstract_state) -> None:
        """Raises UserError naming the first array whose presence or shape differs."""
        saved = _array_shapes(self._manager.item_metadata(step)["state"])
        wanted = _array_shapes(abstract_state)
        where = f"checkpoint {self._manager.directory}/{step}"
        fix = "resume with the config it was trained with, or use a new --workdir"
        for name in sorted(set(saved) ^ set(wanted)):
            found = "has" if name in saved else "lacks"
            raise UserError(f"{where} {found} {name!r}, unlike this model; {fix}")
        for name, shape in wanted.items():
            if saved[name] != shape and name != "rng":  # typed keys are saved as raw key data
                raise UserError(
                    f"{where} holds {name!r} with shape {saved[name]}, this model has {shape}; {fix}"
                )

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _state_directory(source: str, step: int | None = None) -> epath.Path:
    """The saved train state of a run: WORKDIR, WORKDIR/checkpoints or a step directory;
    the latest step unless `step` is given."""
    root = workdir_lib.path(source)
    for candidate in (root / "checkpoints", root):
        steps = [int(d.name) for d in candidate.iterdir() if d.name.isdigit()] if candidate.is_dir() else []
        if steps and step is None:
            return candidate / str(max(steps)) / "state"
        if steps:
            if step not in steps:
                raise UserError(f"{candidate} has no checkpoint of step {step}; it has steps "
                                f"{sorted(steps)}")
            return candidate / str(step) / "state"
    if (root / "state").is_dir() and step is None:
        return root / "state"
    raise UserError(
        f"{source!r} is not a bigalign run: expected WORKDIR, WORKDIR/checkpoints "
        f"or WORKDIR/checkpoints/<step> holding a saved state"
    )


def _restore_params(state_dir: epath.Path, params_like) -> dict:
    """The parameter arrays of a saved state that `params_like` names (a partial restore:
    nothing else is read), laid out like it (arrays or ShapeDtypeStructs with shardings)."""
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params_like)}
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return restored["params"]


def load_initial_params(source: str, like: dict, *, key: str) -> dict:
    """The parameters `like` names ({tower or scalar name: tree}) from another run's
    latest checkpoint (its workdir, or a step directory), laid out like `like`.

    Only those arrays are read. Raises UserError, naming the config `key` that gave
    `source`, if the checkpoint lacks one or shapes it otherwise (another size or variant).
    """
    try:
        state_dir = _state_directory(source)
    except UserError as error:
        raise UserError(f"{key}: {error}") from None
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree["params"]
    fix = f"give {key} a run whose parameters have this config"
    for name in like:
        if name not in saved:
            raise UserError(f"{state_dir} has no {name!r} (it has {sorted(saved)}); {fix}")
        saved_shapes, wanted_shapes = _array_shapes(saved[name]), _array_shapes(like[name])
        for array in sorted(set(saved_shapes) | set(wanted_shapes)):
            if saved_shapes.get(array) != wanted_shapes.get(array):
                raise UserError(
                    f"{state_dir} holds {name}/{array} with shape {saved_shapes.get(array)}, this "
                    f"model has {wanted_shapes.get(array)}; {fix}"
                )
    return _restore_params(state_dir, like)


def load_params(workdir: str, params_like, step: int | None = None) -> tuple[dict, int]:
    """(parameters, step) of the latest (or the given) checkpoint of the run in `workdir`."""
    state_dir = _state_directory(workdir, step)
    return _restore_params(state_dir, params_like), int(state_dir.parent.name)


def _array_shapes(tree) -> dict[str, tuple]:
    """{"params/image/encoder/...": shape} for every array in a state or checkpoint metadata tree."""

    def name(key) -> str:
        return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

    return {
        "/".join(name(key) for key in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
