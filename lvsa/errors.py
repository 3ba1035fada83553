"""Every exception lvsa raises on purpose (a leaf module: it imports nothing from lvsa).

Catch :class:`LVSAError` for any of them; each also derives from the builtin a caller
would expect (``ValueError`` for bad input, ``RuntimeError`` for a backend that cannot
run), so existing ``except ValueError`` code keeps working.
"""
from __future__ import annotations

from typing import Dict, List, Optional


class LVSAError(Exception):
    """Base of every lvsa exception."""


class LVSAInputError(LVSAError, ValueError):
    """Bad tensors handed to lvsa (shape, dtype, device, non-finite values)."""


class UnknownBackend(LVSAError, ValueError):
    """A backend name no installed distribution registers."""


class BackendUnavailable(LVSAError, RuntimeError):
    """A backend (or every backend, in auto mode) cannot run the problem.

    ``refused`` maps each backend name to its reasons.
    """

    def __init__(self, message: str, refused: Optional[Dict[str, List[str]]] = None):
        super().__init__(message)
        self.refused = dict(refused or {})


class BackendNameClash(LVSAError, RuntimeError):
    """Two registered backends share one name."""


class BackendOutputError(LVSAError, RuntimeError):
    """A backend returned a tensor of the wrong shape, dtype or device, or non-finite
    values from finite inputs."""

    def __init__(self, message: str, backend: str = "?"):
        super().__init__(message)
        self.backend = backend


class PlanTooLarge(LVSAError, ValueError):
    """A schedule longer than :data:`lvsa.schedule.MAX_LATENT_FRAMES` latent frames."""


class ContextParallelError(LVSAError, RuntimeError):
    """A context-parallel run cannot go on: a split that does not divide, ranks that
    disagree, a rank that failed or never reached a collective."""


class UserError(LVSAError, ValueError):
    """Bad input to a command (a path, a flag, a file): printed as one line, exit code 2.

    Raised before anything heavy is loaded or anything is written wherever the input
    can be checked that early.
    """
