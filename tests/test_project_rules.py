"""The project's own rules: every model file stands alone, and every marked copy equals its source."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = [n for n in ("gpt_llama", "moe", "bpe", "siglip", "paligemma") if (ROOT / f"{n}.py").exists()]
# What a model file may import at module level; anything else must be imported inside the function
# that needs it. bpe.py also needs `regex`, which tiktoken installs, for its Unicode split patterns.
ALLOWED_TOP_LEVEL = {"torch", "numpy", "PIL", "regex"} | set(sys.stdlib_module_names)
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


PROJECT_MODULES = {p.stem for p in ROOT.glob("*.py")} | {"siglip", "paligemma", "data", "train", "sample"}

# Runs a file as __main__ from the current folder, with every other module of this project made
# unimportable, so that an editable install of the project cannot hide a missing file.
ALONE = """
import runpy, sys
sys.path.insert(0, ".")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is another file of the project")
BLOCKED = set(sys.argv[2:])
sys.meta_path.insert(0, Blocker())
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_imports_no_other_project_file(name):
    """Not even lazily inside a function: a copied file must not reach back into the project."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "").split(".")[0]]
        else:
            continue
        others = set(modules) & (PROJECT_MODULES - {name})
        assert not others, f"{name}.py:{node.lineno} imports {others}; copy the block and mark it instead"


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_runs_alone(name, tmp_path):
    """Copied alone into an empty folder, the file imports and its demo runs."""
    shutil.copy(ROOT / f"{name}.py", tmp_path / f"{name}.py")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    blocked = sorted(PROJECT_MODULES - {name})
    # -I: isolated mode, so neither the repository nor the user's site is on sys.path.
    imported = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); import {name}; print({name}.__file__)"],
        **run,
    )
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).resolve().parent == tmp_path.resolve()
    demo = subprocess.run([sys.executable, "-I", "-c", ALONE, f"{name}.py", *blocked], **run)
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


def marked_copies(root=ROOT):
    for path in sorted(root.glob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines, start=1):
            m = MARKER.match(line)
            if m:
                yield path, i, m.group(1), m.group(2)


def copy_problem(path, line, source_file, name):
    """Why the copy marked at path:line differs from its source, or None when it is identical."""
    source_path = path.parent / source_file
    if not source_path.exists():
        return f"{path.name}:{line} names {source_file}, which does not exist"
    originals = definitions(source_path)
    if name not in originals:
        return f"{path.name}:{line}: {source_file} has no top-level {name}"
    copies = definitions(path)
    if name not in copies:
        return f"{path.name}:{line}: the marker names {name}, which {path.name} does not define"
    start, copy = copies[name]
    if start != line + 1:
        return f"{path.name}:{line}: the marker must stand on the line right above {name}"
    if copy != originals[name][1]:
        return f"{path.name}:{start}: {name} has drifted from {source_file}; copy it again or change both"
    return None


def test_copy_markers_are_well_formed():
    """Every `copied from` comment must use the checked form, so that none escapes the check."""
    for path in sorted(ROOT.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if "copied from" in line.lower() and "#" in line:
                assert MARKER.match(line), f"{path.name}:{i}: write it as '# copied from <file>.py: <Name>'"


COPIES = list(marked_copies())


@pytest.mark.skipif(not COPIES, reason="no marked copies yet")
@pytest.mark.parametrize("path,line,source_file,name", COPIES, ids=[f"{p.name}:{n}" for p, _, _, n in COPIES])
def test_marked_copy_equals_its_source(path, line, source_file, name):
    problem = copy_problem(path, line, source_file, name)
    assert problem is None, problem


def test_copy_check_catches_drift(tmp_path):
    """The check itself: an exact copy passes; a changed line, a misplaced marker or a wrong name fail."""
    (tmp_path / "a.py").write_text("def norm(x):\n    return x / 2\n")
    cases = {
        "exact": "# copied from a.py: norm\ndef norm(x):\n    return x / 2\n",
        "drifted": "# copied from a.py: norm\ndef norm(x):\n    return x / 3\n",
        "misplaced": "# copied from a.py: norm\n\ndef norm(x):\n    return x / 2\n",
        "unknown": "# copied from a.py: other\ndef other(x):\n    return x\n",
    }
    verdicts = {}
    for case, text in cases.items():
        (tmp_path / "b.py").write_text(text)
        [(path, line, source_file, name)] = marked_copies(tmp_path)
        verdicts[case] = copy_problem(path, line, source_file, name)
    assert verdicts["exact"] is None
    assert "drifted" in verdicts["drifted"]
    assert "right above" in verdicts["misplaced"]
    assert "has no top-level" in verdicts["unknown"]


@pytest.mark.parametrize("name", [n for n in ("train", "sample", "data") if (ROOT / f"{n}.py").exists()])
def test_generic_scripts_do_not_branch_on_a_model_name(name):
    """train.py, sample.py and data.py learn what a model needs from its file, never from its name."""
    models = {"gpt_llama", "moe", "siglip", "paligemma"}
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            literals = {c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)}
            assert not literals & models, f"{name}.py:{node.lineno} compares with a model name"
