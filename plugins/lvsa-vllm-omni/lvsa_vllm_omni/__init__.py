"""lvsa as vllm-omni's ``LVSA`` diffusion attention backend (vllm-omni 0.30).

vllm-omni loads :func:`register` from the ``vllm_omni.general_plugins`` entry point in
every process (API server, engine core, each diffusion worker). Then::

    vllm serve Wan-AI/Wan2.1-T2V-1.3B-Diffusers --omni \\
        --diffusion-attention-config '{"per_role": {"self": {"backend": "LVSA"}}}'

selects lvsa for the video self-attention; ``LVSA_*`` / ``LVSA_CONFIG`` carry lvsa's
settings. Importing this package imports neither vllm nor vllm-omni.
"""
from __future__ import annotations

import re
import threading
from typing import Optional, Tuple

__version__ = "0.1.0"

#: the vllm-omni releases this plugin is written against
SUPPORTED = ">=0.30,<0.31"
_SUPPORTED_MINOR: Tuple[int, int] = (0, 30)

_lock = threading.Lock()
_state: Optional[bool] = None  # None: not yet; True: registered; False: refused (logged)


def parse_version(text: str) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a version string such as ``0.30.1rc2``; ``None`` if unreadable."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_problem(found: Optional[str]) -> Optional[str]:
    """``None`` when ``found`` satisfies :data:`SUPPORTED`, else why not (for the log line)."""
    if found is None:
        return "vllm-omni is not installed"
    mm = parse_version(found)
    if mm is None:
        return f"unreadable version {found!r}"
    if mm != _SUPPORTED_MINOR:
        return f"vllm-omni {found} is not {SUPPORTED}"
    return None


def installed_version() -> Optional[str]:
    """The installed vllm-omni version, from its distribution metadata (no import: cheap,
    and a stray ``vllm_omni`` directory on ``sys.path`` is not mistaken for it)."""
    from importlib import metadata

    try:
        return metadata.version("vllm-omni")
    except metadata.PackageNotFoundError:
        return None


def register(version: Optional[str] = None) -> bool:
    """Register the ``LVSA`` backend and the HunyuanVideo 1.5 pipelines with vllm-omni.

    Idempotent (vllm-omni calls general plugins in every process, possibly more than
    once). An unsupported vllm-omni is one loud ``[LVSA-FALLBACK] …
    reason=vllm_omni_version`` line and ``False``, never an exception: the server keeps
    serving with its own backends. Returns whether LVSA is registered.
    """
    global _state
    with _lock:
        if _state is not None:
            return _state
        found = installed_version() if version is None else version
        if version_problem(found) is not None:
            from lvsa import telemetry

            telemetry.emit("fallback", origin="lvsa_vllm_omni.register", reason="vllm_omni_version",
                           seq_len="-", found=found or "none", supported=SUPPORTED)
            _state = False
            return False
        from . import compat

        compat.add_backend_member()
        compat.route_ring_to_dense()
        compat.register_pipelines()
        _state = True
        return True


def _reset_for_tests() -> None:
    global _state
    with _lock:
        _state = None


__all__ = ["register", "SUPPORTED", "parse_version", "version_problem", "installed_version", "__version__"]
