"""The errors that are the user's to fix: a value, a file, a folder, a dataset, a run that diverged.

Each of the project's own error types derives from `UsageError` (and from the built-in type that
callers have always caught, ``ValueError`` or ``OSError``). The ``ldm`` command prints these, and
the few library errors that are also the user's (`user_os_error`), as one line; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class UsageError(Exception):
    """A problem with what the user gave or asked for, told in one line that names it."""


class InputError(UsageError, ValueError):
    """A value the user passed (an argument, a config value, a data file) that cannot be used."""


# OS errors about the user's own paths and disk, not about the code.
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC}


def user_os_error(err: BaseException) -> bool:
    """An ``OSError`` the user can act on: a path that is missing, not allowed, of the wrong kind, or a full disk."""
    return isinstance(err, OSError) and err.errno in _USER_ERRNOS


def out_of_memory(err: BaseException) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` on an accelerator, a RuntimeError on the CPU."""
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err)
