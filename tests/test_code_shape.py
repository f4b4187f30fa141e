"""The package's shape rules (docs/architecture.md, "Rules"): no function over 60 lines, no block nested deeper than 4
inside a function, at most 10 modules at the package root, every folder says what it holds, and what the code cites
of docs/ exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dern_stream"
MAX_LINES, MAX_DEPTH, MAX_ROOT_MODULES = 60, 4, 10
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match, ast.TryStar)


def depth(function: ast.AST) -> int:
    """How deep blocks nest in a function's body (an elif or except is its if's or try's own level; a nested
    function is measured on its own)."""
    return max((_statement_depth(s) for s in function.body), default=0)


def _statement_depth(statement: ast.AST) -> int:
    if not isinstance(statement, BLOCKS):
        return 0
    return 1 + max((_statement_depth(s) for s in _inner_statements(statement)), default=0)


def _inner_statements(block: ast.AST) -> list[ast.AST]:
    inner = [*getattr(block, "body", []), *getattr(block, "finalbody", [])]
    inner += [s for part in (*getattr(block, "handlers", []), *getattr(block, "cases", [])) for s in part.body]
    orelse = getattr(block, "orelse", [])
    if isinstance(block, ast.If) and len(orelse) == 1 and isinstance(orelse[0], ast.If):
        return inner + _inner_statements(orelse[0])  # elif
    return inner + orelse


def functions() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node))
    return out


def test_no_function_is_longer_than_60_lines_or_nests_deeper_than_4():
    long = [f"{where} ({node.end_lineno - node.lineno + 1} lines)" for where, node in functions()
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    deep = [f"{where} (depth {depth(node)})" for where, node in functions() if depth(node) > MAX_DEPTH]
    assert not long and not deep, "\n".join(long + deep)


def test_the_measure_counts_nesting_as_a_reader_sees_it():
    source = ("def f(x):\n"
              "    if x:\n        for i in x:\n            with i:\n                try:\n                    pass\n"
              "                except E:\n                    pass\n"
              "    elif x:\n        pass\n    else:\n        pass\n")
    assert depth(ast.parse(source).body[0]) == 4
    nested = source.replace("                    pass\n                except", "                    if i:\n"
                            "                        pass\n                except")
    assert depth(ast.parse(nested).body[0]) == 5


def test_the_package_root_keeps_few_modules_and_every_folder_says_what_it_holds():
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules
    for init in sorted(PACKAGE.rglob("__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init} has no docstring"


def test_code_cites_docs_that_exist():
    """Every `docs/FILE.md` the code names exists, and so does every heading it names there ("Heading")."""
    docs = PACKAGE.parent / "docs"
    cited = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        text = re.sub(r"\\?\n\s*#?\s*", " ", path.read_text()).replace('\\"', '"')  # citations wrap over lines
        for name, heading in re.findall(r'docs/([a-z_]+\.md)(?:, "([^"]+)")?', text):
            page = docs / name
            assert page.is_file(), f"{path.name} cites docs/{name}, which does not exist"
            titles = {line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")}
            assert not heading or heading in titles, f"{path.name} cites docs/{name}, \"{heading}\": no such heading"
            cited += 1
    assert cited > 20
