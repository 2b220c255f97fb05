"""The error type for mistakes a user can fix: bad config, data, or checkpoints.

Its message is one line that names the problem and the fix; the command-line
entry point prints it without a traceback.
"""


class UserError(ValueError):
    """A problem with the user's input (config, data, workdir), not a bug in bigalign."""
