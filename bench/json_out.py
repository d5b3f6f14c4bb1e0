"""Where a bench script's results go: indented JSON at the path its --out names."""

from __future__ import annotations

import json


def write_json(path: str | None, result) -> None:
    """Write `result` to `path` as indented JSON; nothing when no path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
