"""The error of a user's input that cannot work: an option, a path, a shard pattern, a checkpoint.

Its message names what was given and what to do, in one line, so the command line prints it without a traceback
(`cli.main`), also where it is raised inside Lightning's `fit` (a data module's `setup`, a stage's checkpoint
check). Any other exception there keeps its traceback: it may be a bug."""


class UsageError(ValueError):
    """A user's input that cannot work, said in one line naming it (a ValueError, as callers caught before)."""
