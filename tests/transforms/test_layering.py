"""transforms/ stays pure: no Beam, fsspec or pyarrow, statically and at import time, and none of
the packages built on it (pipeline, jobs, bench, tests)."""
import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("apache_beam", "fsspec", "pyarrow")
#: The packages above transforms/: importing one (even inside a function) would bring the
#: forbidden ones in through it, out of sight of both checks here.
UPPER = ("pipeline", "jobs", "bench", "tests")
ROOT = Path(__file__).resolve().parents[2]


def test_no_forbidden_imports_in_source():
    paths = sorted((ROOT / "transforms").rglob("*.py"))
    assert len(paths) > 10 and ROOT / "transforms/attacks/pgd.py" in paths  # not a loop over nothing
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in FORBIDDEN + UPPER, f"{path.relative_to(ROOT)} imports {n}"


def test_importing_transforms_loads_none_of_them():
    mods = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            for p in (ROOT / "transforms").rglob("*.py") if p.name != "__init__.py"]
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
