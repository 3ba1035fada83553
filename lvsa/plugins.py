"""Plugin loading and the backend registry (pluggy, entry-point group ``lvsa``).

* The built-in modules (the ``reference`` backend, the default log sink) register
  through the same hooks as third-party plugins.
* ``LVSA_LOAD_PLUGINS`` is a comma allowlist of entry-point names; unset loads every
  plugin, empty loads none. A plugin that fails to import is reported (event and a
  ``[LVSA-PLUGIN]`` line), skipped, and never breaks lvsa.
* Two backends with one name raise :class:`BackendNameClash` naming both distributions.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

ENTRY_POINT_GROUP = "lvsa"
BUILTIN_DIST = "lvsa"


class BackendNameClash(RuntimeError):
    pass


@dataclass
class PluginRecord:
    name: str
    distribution: str
    version: str
    status: str  # "loaded" | "failed" | "skipped (not in LVSA_LOAD_PLUGINS)"
    error: Optional[str] = None


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.pm = None
        self.backends: Dict[str, object] = {}
        self.plugins: List[PluginRecord] = []
        self.dists: Dict[str, tuple] = {}
        self.generation = 0  # bumped whenever the set of backends may have changed


_state = _State()


def allowlist(env=None) -> Optional[set]:
    env = os.environ if env is None else env
    raw = env.get("LVSA_LOAD_PLUGINS")
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _dist_of(ep) -> tuple:
    d = getattr(ep, "dist", None)
    if d is None:
        return ("?", "?")
    return (d.metadata["Name"] or "?", d.version or "?")


def _make_manager():
    import pluggy

    from . import hookspecs, telemetry
    from .backends import reference

    pm = pluggy.PluginManager("lvsa")
    pm.add_hookspecs(hookspecs)
    pm.register(reference, name="lvsa.reference")
    pm.register(telemetry.DefaultSink(), name="lvsa.log")
    return pm


def _load_entry_points(pm, records: List[PluginRecord]):
    from . import telemetry

    allowed = allowlist()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist, ver = _dist_of(ep)
        if allowed is not None and ep.name not in allowed:
            records.append(PluginRecord(ep.name, dist, ver, "skipped (not in LVSA_LOAD_PLUGINS)"))
            continue
        try:
            obj = ep.load()
            if pm.is_registered(obj) or pm.get_plugin(ep.name) is not None:
                records.append(PluginRecord(ep.name, dist, ver, "loaded"))
                continue
            pm.register(obj, name=ep.name)
            _state.dists[ep.name] = (dist, ver)
            records.append(PluginRecord(ep.name, dist, ver, "loaded"))
        except Exception as e:  # noqa: BLE001 - any plugin failure is reported, not raised
            msg = f"{type(e).__name__}: {e}"
            records.append(PluginRecord(ep.name, dist, ver, "failed", msg))
            telemetry.emit("plugin_error", plugin=ep.name, distribution=dist, error=msg)


def _collect_backends(pm, records: Optional[List[PluginRecord]] = None) -> Dict[str, object]:
    """Ask every plugin to register its backends.

    A plugin whose hook raises is reported, unregistered and skipped like one that failed to
    import; a name clash raises :class:`BackendNameClash` naming both distributions.
    """
    from . import telemetry

    found: Dict[str, object] = {}
    for impl in list(pm.hook.lvsa_register_backends.get_hookimpls()):
        dist, ver = _state.dists.get(impl.plugin_name) or (BUILTIN_DIST, _own_version())
        mine: Dict[str, object] = {}

        def register(backend, _dist=dist, _ver=ver, _mine=mine):
            name = getattr(backend, "name", "")
            if not name:
                raise ValueError(f"a backend registered by {_dist} has no name")
            if name in found or name in _mine:
                other = found.get(name) or _mine[name]
                raise BackendNameClash(
                    f"two backends are named {name!r}: one from distribution "
                    f"{other.distribution!r}, one from {_dist!r}; uninstall one or exclude it "
                    "with LVSA_LOAD_PLUGINS")
            backend.distribution = _dist
            backend.distribution_version = _ver
            _mine[name] = backend

        try:
            impl.function(register=register)
        except BackendNameClash:
            raise
        except Exception as e:  # noqa: BLE001 - a broken plugin never breaks lvsa
            msg = f"{type(e).__name__}: {e}"
            pm.unregister(name=impl.plugin_name)
            if records is not None:
                records.append(PluginRecord(impl.plugin_name, dist, ver, "failed", msg))
            telemetry.emit("plugin_error", plugin=impl.plugin_name, distribution=dist, error=msg)
            continue
        found.update(mine)
    return found


def _own_version() -> str:
    try:
        return md.version("lvsa")
    except md.PackageNotFoundError:
        from . import __version__
        return __version__


def plugin_manager():
    """The process-wide pluggy manager (built and plugins loaded on first use).

    If building it fails (a backend name clash), nothing is kept: every later use raises
    the same error again instead of running with an empty registry.
    """
    with _state.lock:
        if _state.pm is None:
            pm = _make_manager()
            _state.pm = pm  # visible to telemetry while loading
            records: List[PluginRecord] = []
            try:
                _load_entry_points(pm, records)
                _state.backends = _collect_backends(pm, records)
            except BaseException:
                reset()
                raise
            _state.plugins = records
            _state.generation += 1
        return _state.pm


def backends() -> Dict[str, object]:
    """Every registered backend by name."""
    plugin_manager()
    return dict(_state.backends)


def get_backend(name: str):
    bk = backends()
    if name not in bk:
        from .dispatch import UnknownBackend
        raise UnknownBackend(
            f"unknown backend {name!r}; registered: {', '.join(sorted(bk)) or 'none'} "
            "(a backend from another distribution needs that distribution installed, and "
            "its entry-point name in LVSA_LOAD_PLUGINS when that variable is set)")
    return bk[name]


def plugin_records() -> List[PluginRecord]:
    plugin_manager()
    return list(_state.plugins)


def register_plugin(obj, name: Optional[str] = None, distribution: str = "<direct>"):
    """Register a plugin object directly (tests, notebooks); backends are re-collected."""
    with _state.lock:
        pm = plugin_manager()
        name = pm.register(obj, name=name)
        _state.dists[name] = (distribution, "?")
        try:
            _state.backends = _collect_backends(pm, _state.plugins)
        except Exception:
            pm.unregister(obj)
            _state.backends = _collect_backends(pm)
            raise
        finally:
            _state.generation += 1
        return name


def unregister_plugin(obj):
    with _state.lock:
        pm = plugin_manager()
        pm.unregister(obj)
        _state.backends = _collect_backends(pm)
        _state.generation += 1


def generation() -> int:
    """Changes whenever the registered backends may have changed (selection cache key)."""
    return _state.generation


def reset():
    """Forget the manager: the next use reloads entry points (tests, env changes)."""
    with _state.lock:
        _state.pm = None
        _state.backends = {}
        _state.plugins = []
        _state.dists = {}
        _state.generation += 1
