"""The one error type of the data layer, apart so that every data module can raise it without cycles."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the record or file and the fault."""
