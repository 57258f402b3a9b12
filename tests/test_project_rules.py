"""The project's own rules: every model file stands alone, and every marked copy equals its source."""

import ast
import os
import re
import shutil
import subprocess
import sys
import sys as _sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = [n for n in ("gpt_llama", "moe", "bpe", "siglip", "paligemma") if (ROOT / f"{n}.py").exists()]
# What a model file may import at module level; anything else must be imported inside the function
# that needs it. bpe.py also needs `regex`, which tiktoken installs, for its Unicode split patterns.
ALLOWED_TOP_LEVEL = {"torch", "numpy", "PIL", "regex"} | set(_sys.stdlib_module_names)
MARKER = re.compile(r"^\s*# copied from (\w+\.py): (\w+)\s*$")


def top_level_imports(tree):
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield (node.module or "").split(".")[0]


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_imports_only_allowed_modules(name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    bad = sorted(set(top_level_imports(tree)) - ALLOWED_TOP_LEVEL)
    assert not bad, f"{name}.py imports {bad} at module level; import optional extras lazily"


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_runs_alone(name, tmp_path):
    """Copied alone into an empty folder, the file imports and its demo runs."""
    shutil.copy(ROOT / f"{name}.py", tmp_path / f"{name}.py")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    # -I: isolated mode, so neither the repository nor an editable install is on sys.path.
    imported = subprocess.run([sys.executable, "-I", "-c", f"import {name}; print({name}.__file__)"], **run)
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).parent == tmp_path
    demo = subprocess.run([sys.executable, "-I", f"{name}.py"], **run)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-4000:]


def definitions(path):
    """Top-level classes, functions and assignments of a file, by name, as source text."""
    source = path.read_text()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for n in names:
            found[n] = (start, "\n".join(lines[start - 1 : node.end_lineno]))
    return found


def marked_copies():
    for path in sorted(ROOT.glob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines, start=1):
            m = MARKER.match(line)
            if m:
                yield path, i, m.group(1), m.group(2)


def test_copy_markers_are_well_formed():
    """Every `copied from` comment must use the checked form, so that none escapes the check."""
    for path in sorted(ROOT.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if "copied from" in line.lower() and "#" in line:
                assert MARKER.match(line), f"{path.name}:{i}: write it as '# copied from <file>.py: <Name>'"


@pytest.mark.parametrize("path,line,source_file,name", list(marked_copies()) or [pytest.param(None, 0, "", "", marks=pytest.mark.skip("no marked copies yet"))])
def test_marked_copy_equals_its_source(path, line, source_file, name):
    source_path = ROOT / source_file
    assert source_path.exists(), f"{path.name}:{line} names {source_file}, which does not exist"
    originals = definitions(source_path)
    assert name in originals, f"{path.name}:{line}: {source_file} has no top-level {name}"
    copies = definitions(path)
    assert name in copies, f"{path.name}:{line}: the marker names {name}, which {path.name} does not define"
    start, copy = copies[name]
    assert start == line + 1, f"{path.name}:{line}: the marker must stand on the line right above {name}"
    assert copy == originals[name][1], (
        f"{path.name}:{start}: {name} has drifted from {source_file}; copy it again or change both"
    )
