"""tools/check_layout.py on small made-up packages: each rule fires on a breach and is quiet on code that keeps it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "check_layout.py"


@pytest.fixture(scope="module")
def layout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layout", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layout"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def function(name: str, body_lines: int, decorators: int = 0) -> str:
    """A function of 1 signature line + ``body_lines`` + ``decorators`` lines."""
    return "".join("@staticmethod\n" for _ in range(decorators)) + f"def {name}():\n" + "    x = 1\n" * body_lines


def problems(layout: ModuleType, root: Path, packages: tuple[str, ...] = ("pkg",)) -> list[tuple[str, int, str, str]]:
    return [(p.path, p.line, p.rule, p.detail) for p in layout.check(root, packages)]


def test_module_size_counts_lines(layout, tmp_path) -> None:
    write_tree(tmp_path, {"pkg/__init__.py": "", "pkg/ok.py": "x = 1\n" * 400, "pkg/big.py": "x = 1\n" * 401})
    assert problems(layout, tmp_path) == [("pkg/big.py", 1, "module-size", "401 lines (limit 400)")]


def test_function_size_counts_decorators_signature_and_body(layout, tmp_path) -> None:
    source = (
        function("fits", 79)
        + "\n"
        + function("decorated", 78, decorators=2)
        + "\n"
        + function("long", 80)
        + "\nclass C:\n    def method(self):\n"
        + "        x = 1\n" * 80
    )
    write_tree(tmp_path, {"pkg/__init__.py": "", "pkg/mod.py": source})
    found = problems(layout, tmp_path)
    assert [(line, rule, detail) for _, line, rule, detail in found] == [
        (82, "function-size", "decorated is 81 lines (limit 80)"),  # the decorators start it
        (164, "function-size", "long is 81 lines (limit 80)"),
        (247, "function-size", "method is 81 lines (limit 80)"),
    ]


def test_private_names_imported_across_modules(layout, tmp_path) -> None:
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "__version__ = '1'\n",
            "pkg/records.py": "def _first():\n    pass\n\n\ndef first():\n    pass\n",
            "pkg/_helpers.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/user.py": (
                "from pkg import __version__\n"  # a dunder is public
                "from ..records import first\n"
                "from ..records import _first\n"
                "from pkg import _helpers\n"
                "import os._exit_codes_are_not_ours\n"
                "def lazy():\n    from pkg.records import _first as f\n"
            ),
        },
    )
    assert problems(layout, tmp_path) == [
        ("pkg/sub/user.py", 3, "private-import", "_first imported from pkg.records"),
        ("pkg/sub/user.py", 4, "private-import", "_helpers imported from pkg._helpers"),
        ("pkg/sub/user.py", 7, "private-import", "_first imported from pkg.records"),  # in a function too
    ]


def test_import_cycles_at_module_level(layout, tmp_path) -> None:
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "from . import a\n",  # pkg -> a; a's parent package is not an edge
            "pkg/a.py": "import os\nfrom .b import thing\n",
            "pkg/b.py": "from . import c\nthing = 1\n",
            "pkg/c.py": "try:\n    from pkg.a import x\nexcept ImportError:\n    pass\n",
            "pkg/lazy.py": "def f():\n    from . import lazy2\n",  # inside a function: allowed
            "pkg/lazy2.py": "from . import lazy\n",
            "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import typed2\n",
            "pkg/typed2.py": "from pkg import typed\n",
        },
    )
    assert problems(layout, tmp_path) == [("pkg/a.py", 2, "import-cycle", "pkg.a -> pkg.b -> pkg.c -> pkg.a")]


def test_a_tree_that_keeps_the_rules_passes_and_the_command_reports(layout, tmp_path) -> None:
    write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from .b import x\n" + function("f", 79),
            "pkg/b.py": "x = 1\n",
            "other/big.py": "x = 1\n" * 500,
        },
    )
    assert problems(layout, tmp_path) == []
    ok = subprocess.run([sys.executable, str(TOOL), "--root", str(tmp_path), "pkg"], capture_output=True, text=True)
    assert ok.returncode == 0 and "hold the rules" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(tmp_path), "pkg", "other"], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        "other/big.py:1: module-size: 500 lines (limit 400)",
        "layout: 1 problem (module-size: 1)",
    ]
    missing = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(tmp_path), "nope"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no package folder nope" in missing.stderr


def test_the_checkout_is_checked_by_make_lint() -> None:
    makefile = (REPO / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "tools/check_layout.py" in lint and "ruff check" in lint and "ruff format --check" in lint
    ci = (REPO / ".ci" / "run").read_text()
    assert 0 <= ci.index("make lint") < ci.index("make test")
