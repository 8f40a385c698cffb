"""Exceptions raised by bertfast."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (or cannot run these inputs).

    The message always says why: a missing package, no GPU, an unsupported dtype
    or head size.  bertfast never falls back silently from an explicit backend.
    """
