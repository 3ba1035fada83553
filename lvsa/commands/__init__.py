"""The ``lvsa`` subcommands, one module each.

Every module here exposes ``register(subparsers)``, which adds its parser(s) and sets
``func``. :mod:`lvsa.cli` only wires them (the list :data:`lvsa.cli.COMMANDS`); a module
whose optional dependency is missing raises :class:`ImportError` at import and the CLI
registers an explanation in its place.
"""
