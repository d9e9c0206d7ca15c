"""The one kind of error that is the user's to fix, and the only one the CLI shortens.

``UserError`` is raised where input is checked (an option, a recipe, a data folder, a weights
file, a run folder) and where the machine refuses (a full disk): the CLI prints its message as
one line and exits 2. Anything else is a bug in fasttricks or a library, and keeps its traceback.
The subclasses also derive from the builtin a caller would expect, so ``except ValueError`` or
``pytest.raises(FileNotFoundError)`` keep working."""

from __future__ import annotations


class UserError(Exception):
    """Input that cannot be used, with a message that says what to change."""


class InputError(UserError, ValueError):
    """A bad value: an option, a setting, a file's contents."""


class InputMissing(UserError, FileNotFoundError):
    """A file or folder that was named does not exist, or holds nothing usable."""


class OutputExists(UserError, FileExistsError):
    """The output is already there and --overwrite was not given."""


class OutputUnusable(UserError, OSError):
    """A path named for output that cannot serve: a file where a folder is needed, a folder below a
    file, a place this user may not write."""
