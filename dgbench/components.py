"""Registers every component: built-ins, plugins, and the config schemas Hydra composes."""

from __future__ import annotations

import functools


@functools.cache
def _load_builtins() -> None:
    import dgbench.algorithms
    import dgbench.backbones
    import dgbench.data.embedded
    import dgbench.data.folder
    import dgbench.data.mnist  # noqa: F401
    from dgbench.config import register_schemas

    register_schemas()


def load_components() -> None:
    """Import built-in components, then plugins (so a plugin may extend a built-in)."""
    from dgbench.plugins import load_plugins

    _load_builtins()
    load_plugins()
