"""pyarrow.types for TRL's import chain only (see __init__.py): any name is a placeholder."""

from . import _placeholder


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _placeholder(f"pyarrow.types.{name}")
