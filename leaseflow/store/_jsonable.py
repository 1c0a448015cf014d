"""Datetimes as ISO strings, for the records' ``to_dict``."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}
