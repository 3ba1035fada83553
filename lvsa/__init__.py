"""lvsa — training-free block-sparse attention for long-video diffusion transformers.

``import lvsa`` needs only torch; plugins (pluggy), backends and integrations load lazily.
"""
from ._version import __version__  # noqa: E402

from .errors import BackendUnavailable, LVSAError, LVSAInputError, UnknownBackend  # noqa: E402
from .mask import BlockMask, dense_mask  # noqa: E402
from .geometry import detect_geometry, latent_frames, patches_per_frame  # noqa: E402
from .presets import PRESETS, get_preset  # noqa: E402
from .schedule import Schedule, compute_key_frame_interval, plan_schedule  # noqa: E402
from .config import Config, current_config  # noqa: E402
from .api import attention  # noqa: E402


def __getattr__(name):
    # lazy: these pull in pluggy / diffusers only when used
    if name in ("use_backend", "select_backend"):
        from . import dispatch
        return getattr(dispatch, name)
    if name in ("enable", "disable"):
        from . import integrations
        return getattr(integrations, name)
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name == "session_summary":
        from .telemetry import session_summary
        return session_summary
    if name == "backends":
        from .plugins import backends
        return backends
    raise AttributeError(f"module 'lvsa' has no attribute {name!r}")


__all__ = ["BlockMask", "dense_mask", "PRESETS", "Schedule", "compute_key_frame_interval",
           "get_preset", "latent_frames", "patches_per_frame", "plan_schedule", "Config",
           "detect_geometry", "attention", "current_config", "use_backend", "select_backend",
           "BackendUnavailable", "UnknownBackend", "LVSAError", "LVSAInputError", "enable", "disable", "Engine",
           "session_summary", "backends", "__version__"]
