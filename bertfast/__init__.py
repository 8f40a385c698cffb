"""bertfast: a custom-kernel performance engine for BERT."""

from .errors import BackendUnavailable

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "__version__"]
