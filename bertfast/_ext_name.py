"""The extension's module name for a torch version (plain Python: setup.py reads this file by path).

An extension built against one torch does not load into another, so each torch gets its own module,
``bertfast._C_torch<version>``: two environments on one checkout (editable installs build in place) keep
their own builds instead of overwriting one file, and :mod:`bertfast._ext` loads the running torch's.
"""

import re


def extension_module_name(torch_version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"_C_torch2_13_0_cpu"`` (the version's CUDA tag, e.g. ``+cu130``, is part of it)."""
    return "_C_torch" + re.sub(r"[^0-9A-Za-z]+", "_", torch_version)
