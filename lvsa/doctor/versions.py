"""Which vllm-omni a run used, and so which lvsa plugin served it.

Two plugins exist. The published implementation's, for vllm-omni 0.22, needs
``LVSA_WAN_HOOK=1`` for Wan (the troubleshooting guide's advice: without it Wan's
``_sp_plan`` hands attention a pre-sharded sequence). ``lvsa-vllm-omni`` (this
repository's ``plugins/lvsa-vllm-omni``), for vllm-omni 0.30, reads Wan's latent grid
from the attention metadata's ``video_layout`` and does not read ``LVSA_WAN_HOOK``.
Advice about Wan under vllm-omni therefore depends on the version, found in this order:

1. the log names vllm-omni's version: ``vLLM-Omni version X`` (vllm-omni's own version
   check), ``vllm-omni==X``, a ``pip list`` row, ``pip show vllm-omni``, or the plugin's
   ``reason=vllm_omni_version … found=X`` line;
2. the log names vLLM's version (``vLLM API server version X``): vllm-omni releases
   follow vLLM's major.minor (vllm-omni warns when they differ);
3. the vllm-omni installed in the environment ``lvsa doctor`` runs in;
4. otherwise unknown: the advice gives both cases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .logparse import LogRecord, ParsedLog

#: the vllm-omni release lvsa-vllm-omni is written for (``lvsa_vllm_omni.SUPPORTED``)
PLUGIN_VLLM_OMNI: Tuple[int, int] = (0, 30)


def minor_of(version: Optional[str]) -> Optional[Tuple[int, int]]:
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def installed_vllm_omni() -> Optional[str]:
    """The vllm-omni installed here, from its distribution metadata (no import)."""
    from importlib import metadata

    try:
        return metadata.version("vllm-omni")
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class VllmOmniVersion:
    """The vllm-omni version behind a run, where it came from, and the log line that says so."""

    version: Optional[str] = None
    where: str = ""                       # "the log", "vLLM's version in the log", "this environment"
    record: Optional[LogRecord] = None

    @property
    def reads_video_layout(self) -> Optional[bool]:
        """``True``: vllm-omni 0.30 or later (lvsa-vllm-omni: Wan's grid from ``video_layout``);
        ``False``: an earlier one (the published 0.22 plugin: ``LVSA_WAN_HOOK=1`` for Wan);
        ``None``: unknown."""
        mm = minor_of(self.version)
        return None if mm is None else mm >= PLUGIN_VLLM_OMNI

    def describe(self) -> str:
        if self.version is None:
            return "the vllm-omni version is not in the log (nor installed here)"
        return f"vllm-omni {self.version} ({self.where})"


def vllm_omni_version(log: ParsedLog,
                      installed: Callable[[], Optional[str]] = installed_vllm_omni) -> VllmOmniVersion:
    """The vllm-omni version of the run in ``log`` (see the module's order of sources)."""
    named = [r for r in log.of("version") if r.get("package") == "vllm-omni"]
    named += [r for r in log.of("fallback") if r.get("reason") == "vllm_omni_version"
              and minor_of(r.get("found")) is not None]
    if named:
        r = max(named, key=lambda r: r.lineno)  # the last word: a later line is a later install
        v = r.get("version") if r.kind == "version" else str(r.get("found"))
        return VllmOmniVersion(v, "the log", r)
    vllm = [r for r in log.of("version") if r.get("package") == "vllm"]
    if vllm:
        r = vllm[-1]
        return VllmOmniVersion(r.get("version"), f"the log's vLLM {r.get('version')}: vllm-omni follows its "
                               "major.minor", r)
    found = installed()
    if found:
        return VllmOmniVersion(found, "installed in this environment; the log names no version")
    return VllmOmniVersion()


__all__ = ["PLUGIN_VLLM_OMNI", "VllmOmniVersion", "installed_vllm_omni", "minor_of", "vllm_omni_version"]
