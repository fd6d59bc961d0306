"""Plugin discovery: import third-party modules that register components.

Plugins are imported before Hydra composes the config, so their algorithms,
datasets and backbones appear in the CLI like built-ins. Two sources, both read
every time (importing an already-imported module is a no-op):
- `DGBENCH_PLUGINS`: module paths separated by commas (or the OS path separator);
- entry points of the group `dgbench.plugins` in installed packages.
"""

from __future__ import annotations

import importlib
import os
import re
from importlib.metadata import entry_points

from dgbench.errors import ConfigError

PLUGINS_ENV = "DGBENCH_PLUGINS"
ENTRY_POINT_GROUP = "dgbench.plugins"


def plugin_modules() -> list[str]:
    """Module names listed in `DGBENCH_PLUGINS`."""
    raw = os.environ.get(PLUGINS_ENV, "")
    return [name for name in re.split(rf"[,{re.escape(os.pathsep)}\s]+", raw) if name]


def load_plugins() -> list[str]:
    """Import every plugin module; returns their names. A failing import names the plugin."""
    loaded = []
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(
                f"{PLUGINS_ENV}: cannot import plugin module {name!r} ({error}); "
                "check the module name and that its directory is on PYTHONPATH"
            ) from error
        loaded.append(name)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
        loaded.append(entry.value)
    return loaded
