"""Reading and rewriting ``kernels/launch_table.py``, the committed launch-configuration data.

Two tools write it: ``gpu_check.py --apply-tune`` (TABLE, from a GPU run's sweep) and
``sm90_compile.py --write-exclusions`` (OVER_SM90_LIMITS, from the offline compile reports).
Each replaces its own part and keeps the other; the docstring at the top stays as it is.
"""
from __future__ import annotations

import importlib.util
import pprint
from pathlib import Path

TABLE_PATH = Path(__file__).resolve().parent.parent / "kernels" / "launch_table.py"
_FIRST = "OVER_SM90_LIMITS"  # the first data line starts so: everything before it is the header


def load(path: Path = TABLE_PATH) -> tuple[dict[str, dict], frozenset[str]]:
    """(TABLE, OVER_SM90_LIMITS) of a launch-table file (the committed one, or a copy)."""
    spec = importlib.util.spec_from_file_location("launch_table_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TABLE, module.OVER_SM90_LIMITS


def write(table: dict[str, dict] | None = None, over: frozenset[str] | None = None,
          path: Path = TABLE_PATH) -> None:
    """Rewrite the file with ``table`` and/or ``over`` (None keeps what the file has)."""
    old_table, old_over = load(path)
    table = old_table if table is None else table
    over = old_over if over is None else over
    text = path.read_text()
    header = text[:text.index(f"\n{_FIRST}:") + 1]
    entries = "".join(f"    {key!r}: {pprint.pformat(table[key], width=200, sort_dicts=False)},\n"
                      for key in sorted(table))
    excluded = "".join(f"    {item!r},\n" for item in sorted(over))
    path.write_text(f"{header}{_FIRST}: frozenset[str] = frozenset({{\n{excluded}}})\n\n"
                    f"TABLE: dict[str, dict] = {{\n{entries}}}\n")
