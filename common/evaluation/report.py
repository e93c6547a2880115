"""evaluation.json: validation against its schema (common/evaluation/schema.py) and writing.

The plots are in plots.py, report.md in markdown.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from .schema import EVALUATION_SCHEMA, SCHEMA_VERSION

__all__ = ["EVALUATION_SCHEMA", "SCHEMA_VERSION", "SchemaError", "to_jsonable", "validate", "write_json"]


class SchemaError(ValueError):
    """evaluation.json content that does not follow EVALUATION_SCHEMA; the message names the path."""


def _is_number(_checker: Any, value: Any) -> bool:
    # JSON has no NaN/inf: to_jsonable writes them as null, so a non-finite number is a malformed report.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(_checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # 1.0 is not a count


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _is_number, "integer": _is_integer}),
)


def _where(error: jsonschema.ValidationError) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _message(error: jsonschema.ValidationError) -> str:
    """The error in this project's words (callers and tests match on them), prefixed by its JSON path."""
    value, rule, kind = error.instance, error.validator_value, error.validator
    if kind == "type":
        names = [rule] if isinstance(rule, str) else list(rule)
        text = f"expected {' or '.join(names)}, got {type(value).__name__} {value!r:.80}"
    elif kind == "required":
        text = f"missing key '{next(k for k in rule if k not in value)}'"
    elif kind == "additionalProperties":
        known = error.schema.get("properties", {})
        text = f"unexpected key '{next(k for k in value if k not in known)}'"
    elif kind == "enum":
        text = f"{value!r} is not one of {rule}"
    elif kind == "minimum":
        text = f"{value} is below the minimum {rule}"
    elif kind == "maximum":
        text = f"{value} is above the maximum {rule}"
    else:
        text = error.message
    return f"{_where(error)}: {text}"


def validate(value: Any, schema: dict[str, Any] = EVALUATION_SCHEMA) -> None:
    """Raise SchemaError at the first place `value` departs from `schema`."""
    error = jsonschema.exceptions.best_match(_Validator(schema).iter_errors(value))
    if error is not None:
        raise SchemaError(_message(error))


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Validate and write evaluation.json."""
    report = to_jsonable(report)
    validate(report)
    path = Path(out_dir) / "evaluation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path
