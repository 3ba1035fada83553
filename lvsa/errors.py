"""Exception classes shared across lvsa."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input to a command (a path, a flag, a file): printed as one line, exit code 2.

    Raised before anything heavy is loaded or anything is written wherever the input
    can be checked that early.
    """
