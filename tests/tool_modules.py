"""Loading a script of tools/ into a test process without leaving its absl flags behind.

The tools define their flags in absl's global FlagValues when imported, and several use the
same names (tools/plot_run.py and tools/layer_table.py both define --output): two of them
imported into one process (pytest-xdist runs several test files in one) would fail with a
DuplicateFlagError. `load_tool` imports one and removes the flags it added.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/`name`.py as a module; its absl flags are removed from the global FlagValues."""
    from absl import flags

    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
    return module
