"""Reading a run folder's JSON files: one loader for the report (which notes a problem and goes on) and for
`reproduce` (which stops at it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, the problem): 'missing', or 'unparsable (<the parser's words>)'."""
    if not path.is_file():
        return None, "missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"unparsable ({error})"
