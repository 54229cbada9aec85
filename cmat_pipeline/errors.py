"""Exceptions that carry an actionable message for the person running cmat."""


class CmatError(Exception):
    """Base class: every error cmat raises on purpose names the file, key or row at fault."""


class ConfigError(CmatError):
    """params.yaml (or an override) has an unknown key, a wrong type or an out-of-range value."""


class ModelPreparationError(CmatError):
    """The base model could not be found, verified, converted or loaded."""


class DataError(CmatError):
    """A task or data file is missing or malformed."""


class BackendError(CmatError):
    """A database backend could not be reached or set up."""
