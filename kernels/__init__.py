"""bertfast.kernels: Triton kernels, one file per op.

Importing a kernel module registers its ``bertfast::`` custom ops with torch.library.
Set ``TRITON_INTERPRET=1`` before importing triton to run them on the CPU (tests).

This folder is installed as ``bertfast.kernels`` only.  Where the repository root is on ``sys.path`` (a
script, ``setup.py`` or pytest run from it) it is also found under the top-level name ``kernels``, which
belongs to Hugging Face's package (transformers >= 5.25 imports it, and its setuptools entry point runs in
every ``egg_info``).  Imported under that name, this module therefore steps aside: it loads the real
package from the rest of ``sys.path`` and puts it in ``sys.modules``, which the import system then returns.
Where that package is not installed (transformers 5.17 does not need it) it stays an empty package without
``__version__``, which transformers' availability check, importing a ``kernels`` it finds no metadata for,
reads as not installed.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repo_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _repo_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _package = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _package
        _spec.loader.exec_module(_package)
