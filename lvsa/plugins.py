"""Plugin loading, the backend registry and event delivery (pluggy, entry-point group ``lvsa``).

* The built-in modules (the ``reference`` backend, the default log sink) register
  through the same hooks as third-party plugins.
* ``LVSA_LOAD_PLUGINS`` is a comma allowlist of entry-point names; unset loads every
  plugin, empty loads none. An entry that names no installed plugin is warned about
  once, with the nearest name. A plugin that fails to import is reported (event and a
  ``[LVSA-PLUGIN]`` line), skipped, and never breaks lvsa.
* Two backends with one name are a :class:`~lvsa.errors.BackendNameClash` naming both
  distributions: every use of the registry raises it, while :func:`plugin_records` and
  :func:`name_clash` still describe it (``lvsa info`` shows it instead of crashing).
* Events reach every ``lvsa_event`` hook through :func:`deliver`; a sink that raises is
  reported once (``[LVSA-PLUGIN] … disabled: …``) and unregistered, and the run goes on.
"""
from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

from .errors import BackendNameClash, UnknownBackend
from .events import Event

__all__ = ["BackendNameClash", "PluginRecord", "plugin_manager", "backends", "get_backend",
           "plugin_records", "name_clash", "register_plugin", "unregister_plugin", "deliver",
           "declared_settings", "generation", "reset", "allowlist", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "lvsa"
BUILTIN_DIST = "lvsa"


@dataclass
class PluginRecord:
    name: str
    distribution: str
    version: str
    status: str  # "loaded" | "failed" | "disabled" | "skipped (not in LVSA_LOAD_PLUGINS)"
    error: Optional[str] = None


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.pm = None
        self.backends: Dict[str, object] = {}
        self.plugins: List[PluginRecord] = []
        self.dists: Dict[str, tuple] = {}
        self.clash: Optional[BackendNameClash] = None
        self.clash_records: List[PluginRecord] = []
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

    from . import hookspecs
    from .backends import reference
    from .sink import DefaultSink

    pm = pluggy.PluginManager("lvsa")
    pm.add_hookspecs(hookspecs)
    pm.register(reference, name="lvsa.reference")
    pm.register(DefaultSink(), name="lvsa.log")
    return pm


def _report(pm, plugin: str, distribution: str, error: str, what: Optional[str] = None):
    fields = {"plugin": plugin, "distribution": distribution, "error": error}
    if what:
        fields["what"] = what
    _deliver(pm, Event("plugin_error", fields))


def _load_entry_points(pm, records: List[PluginRecord]):
    allowed = allowlist()
    eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
    if allowed:
        names = sorted({ep.name for ep in eps})
        for want in sorted(allowed - set(names)):
            near = difflib.get_close_matches(want, names, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            _deliver(pm, Event("warning", {"message": (
                f"LVSA_LOAD_PLUGINS names {want!r}, but no installed plugin has that entry-point "
                f"name (installed: {', '.join(names) or 'none'}){hint}")}))
    for ep in eps:
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
            _report(pm, ep.name, dist, msg)


def _collect_backends(pm, records: Optional[List[PluginRecord]] = None) -> Dict[str, object]:
    """Ask every plugin to register its backends.

    A plugin whose hook raises is reported, unregistered and skipped like one that failed to
    import; a name clash raises :class:`BackendNameClash` naming both distributions.
    """
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
                err = BackendNameClash(
                    f"two backends are named {name!r}: one from distribution "
                    f"{other.distribution!r}, one from {_dist!r}; uninstall one or exclude it "
                    "with LVSA_LOAD_PLUGINS")
                err.backend = name
                err.distributions = (other.distribution, _dist)
                raise err
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
            _report(pm, impl.plugin_name, dist, msg)
            continue
        found.update(mine)
    return found


def _own_version() -> str:
    try:
        return md.version("lvsa")
    except md.PackageNotFoundError:
        from ._version import __version__
        return __version__


def plugin_manager():
    """The process-wide pluggy manager (built and plugins loaded on first use).

    If building it fails (a backend name clash), nothing is kept: every later use raises
    the same error again instead of running with an empty registry (the clash and the
    plugin records stay readable through :func:`name_clash` and :func:`plugin_records`).
    """
    with _state.lock:
        if _state.pm is None:
            pm = _make_manager()
            _state.pm = pm  # visible to event delivery while loading
            records: List[PluginRecord] = []
            try:
                _load_entry_points(pm, records)
                _state.backends = _collect_backends(pm, records)
            except BackendNameClash as e:
                reset()
                _state.clash = e
                _state.clash_records = records
                raise
            except BaseException:
                reset()
                raise
            _state.plugins = records
            _state.clash = None
            _state.clash_records = []
            _state.generation += 1
        return _state.pm


def backends() -> Dict[str, object]:
    """Every registered backend by name."""
    plugin_manager()
    return dict(_state.backends)


def get_backend(name: str):
    bk = backends()
    if name not in bk:
        near = difflib.get_close_matches(name, list(bk), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UnknownBackend(
            f"unknown backend {name!r}; registered: {', '.join(sorted(bk)) or 'none'}{hint} "
            "(a backend from another distribution needs that distribution installed, and "
            "its entry-point name in LVSA_LOAD_PLUGINS when that variable is set)")
    return bk[name]


def plugin_records() -> List[PluginRecord]:
    """What was found in the entry-point group and what became of it. Never raises for a
    backend name clash (the records of that failed load are returned)."""
    try:
        plugin_manager()
    except BackendNameClash:
        return list(_state.clash_records)
    return list(_state.plugins)


def name_clash() -> Optional[BackendNameClash]:
    """The name clash that keeps the registry from loading, or ``None``."""
    try:
        plugin_manager()
    except BackendNameClash as e:
        return e
    return None


def declared_settings() -> list:
    """Every :class:`~lvsa.config.Setting` declared by a registered backend or an
    ``lvsa_settings`` hook."""
    out = []
    for bk in backends().values():
        for st in getattr(bk, "settings", ()) or ():
            out.append(st)
    pm = plugin_manager()
    for impl in pm.hook.lvsa_settings.get_hookimpls():
        try:
            out.extend(impl.function() or ())
        except Exception as e:  # noqa: BLE001 - a broken plugin never breaks lvsa
            dist = _state.dists.get(impl.plugin_name, (BUILTIN_DIST, ""))[0]
            _report(pm, impl.plugin_name, dist, f"{type(e).__name__}: {e}",
                    what="raised in lvsa_settings() (its settings are not listed)")
    return out


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


def _deliver(pm, event: Event) -> None:
    # each sink on its own: one that raises is reported once and unregistered, the others
    # (and the run) go on. Newest registration first, as pluggy calls hooks.
    for impl in reversed(pm.hook.lvsa_event.get_hookimpls()):
        try:
            impl.function(event=event)
        except Exception as e:  # noqa: BLE001 - a sink never breaks a run
            name = impl.plugin_name
            dist = _state.dists.get(name, (BUILTIN_DIST, ""))[0]
            try:
                pm.unregister(name=name)
            except Exception:  # noqa: BLE001 - already gone
                pass
            with _state.lock:
                _state.plugins.append(PluginRecord(name, dist, "", "disabled",
                                                   f"{type(e).__name__}: {e}"))
            _report(pm, name, dist, f"{type(e).__name__}: {e}",
                    what=f"raised in lvsa_event({event.kind}) and was disabled")


def deliver(event: Event) -> None:
    """Hand ``event`` to every ``lvsa_event`` hook (loading plugins on first use)."""
    _deliver(plugin_manager(), event)


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
        _state.clash = None
        _state.clash_records = []
        _state.generation += 1
