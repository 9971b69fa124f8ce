"""Every third-party module the code imports comes from a distribution setup.cfg declares.

A module that is only installed as someone else's dependency (psutil came with
Airflow) works here and breaks when that dependency changes; declared, it is
installed by `make` on purpose and pinned in constraints.txt.
"""
from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("conf", "lake", "preprocessing", "engines", "jobs", "inference", "medscreen", "medscreen_airflow",
             "synth", "models",
             "dags", "bench", "tests")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [cfg["options"]["install_requires"], *cfg["options.extras_require"].values()]
    return {_norm(re.split(r"[\[<>=!~ ;]", req.strip(), maxsplit=1)[0])
            for block in lines for req in block.strip().splitlines() if req.strip()}


def _imported_top_modules() -> dict[str, str]:
    """Top-level module → one file importing it, over this repository's Python code."""
    ours = {p.stem for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")} | set(CODE_DIRS)
    found: dict[str, str] = {}
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ours and top != "__future__":
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_imported_third_party_modules_are_declared_in_setup_cfg() -> None:
    declared = _declared()
    providers = packages_distributions()
    imported = _imported_top_modules()
    assert {"numpy", "pyarrow", "ray", "psutil"} <= set(imported)  # the scan sees the code
    # Modules not installed here (cuda-python, TensorRT on a CPU machine) cannot be mapped; the
    # import guards around them are what lets the code run without them.
    undeclared = {module: (file, providers[module]) for module, file in imported.items()
                  if module in providers and not {_norm(d) for d in providers[module]} & declared}
    assert not undeclared, ("imported but not declared in setup.cfg (install_requires or an extra), "
                            f"module: (a file importing it, distributions providing it): {undeclared}")
