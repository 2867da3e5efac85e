"""Write README.md's configuration table from ``registry.config.Settings``: one row per
field, its default, and its docstring (the field's documentation lives in one place).

``python tools/config_table.py`` rewrites the table; ``--check`` exits 1 when it is stale.
"""

from __future__ import annotations

import ast
import itertools
import sys
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| flag | environment | default | meaning |\n| --- | --- | --- | --- |\n"
EMPTY = {"redis_url": "(embedded)", "metrics_listen": "(off)"}


def docstrings() -> dict[str, str]:
    """Each Settings field's docstring (the string literal right after it)."""
    tree = ast.parse((ROOT / "registry" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    docs: dict[str, str] = {}
    body = cls.body
    for field_node, doc in itertools.pairwise(body):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(field_node.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
        ):
            docs[field_node.target.id] = " ".join(str(doc.value.value).split())
    return docs


def table() -> str:
    sys.path.insert(0, str(ROOT))
    from registry.config import ENV_PREFIX, Settings

    docs = docstrings()
    rows = []
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else ""
        shown = EMPTY.get(f.name) or (
            "(off)"
            if default == ""
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | {shown} | {docs[f.name]} |\n")
    return HEADER + "".join(rows)


def main(argv: list[str]) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start = text.index(HEADER)
    end = start + len(HEADER)
    while text.startswith("| `--", end):
        end = text.index("\n", end) + 1
    new = text[:start] + table() + text[end:]
    if "--check" in argv:
        if new != text:
            print("README.md's configuration table is stale: run python tools/config_table.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
