"""A run's directory, local or remote: every file of a workdir goes through here.

Paths are `etils.epath` paths, so a workdir may be a local directory or anything
epath and orbax read and write (`gs://bucket/run` on a TPU pod, where every host
must see the same workdir). Writes are atomic where the filesystem renames
atomically (a temporary file, then a rename): a killed process leaves the old
file or the new one, never half of one.
"""

from etils import epath

from bigalign.errors import UserError


def path(location: str | epath.Path) -> epath.Path:
    """`location` as an absolute epath (a relative local path is taken from the cwd)."""
    resolved = epath.Path(location)
    return resolved if resolved.is_absolute() else resolved.absolute()


def make(location: str) -> epath.Path:
    """Creates the workdir; a location that cannot be one is a UserError."""
    if not location:
        raise UserError("--workdir is empty; give the directory for the run's checkpoints")
    directory = path(location)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--workdir {location!r} is a file, not a directory; give a directory "
                        f"(a new one starts a run, an existing run's resumes it)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"cannot create --workdir {location!r}: {reason}; give a directory "
                        f"you can write") from None
    return directory


def write_atomically(target: epath.Path, data: str | bytes) -> None:
    """Writes `data` to `target` through a temporary file renamed over it (one writer:
    process 0)."""
    temporary = target.parent / (target.name + ".tmp")
    if isinstance(data, bytes):
        temporary.write_bytes(data)
    else:
        temporary.write_text(data, encoding="utf-8")
    temporary.replace(target)
