"""The lvsa hook specifications (pluggy project name ``lvsa``, entry-point group ``lvsa``).

A plugin is a module (or object) with functions marked ``@hookimpl``::

    from lvsa.hookspecs import hookimpl

    @hookimpl
    def lvsa_register_backends(register):
        register(MyBackend())

    @hookimpl
    def lvsa_event(event):
        print(event.kind, event.fields)

and is found through an entry point in the ``lvsa`` group of its distribution.
"""
import pluggy

hookspec = pluggy.HookspecMarker("lvsa")
hookimpl = pluggy.HookimplMarker("lvsa")


@hookspec
def lvsa_register_backends(register):
    """Call ``register(backend)`` once for each :class:`lvsa.backend.Backend` instance."""


@hookspec
def lvsa_event(event):
    """Receive one :class:`lvsa.events.Event` (schedule, engaged, fallback, step, …).

    A hook that raises is reported once (``[LVSA-PLUGIN] … disabled``) and unregistered;
    the run goes on."""


@hookspec
def lvsa_settings():
    """Return the :class:`lvsa.config.Setting` objects (``LVSA_*`` variables) this plugin
    reads, so ``lvsa info --vars`` lists them, their values are validated like lvsa's own
    and their names are not reported as misspelled. Backends declare theirs on
    :attr:`lvsa.backend.Backend.settings` instead."""
