"""The project's own rules: every model file stands alone, and every marked copy equals its source, or is
its source with parts left out where the marker says it is adapted."""

import ast
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = [n for n in ("gpt_llama", "moe", "bpe", "siglip", "paligemma") if (ROOT / f"{n}.py").exists()]
# What a model file may import at module level; anything else must be imported inside the function
# that needs it. bpe.py also needs `regex`, which tiktoken installs, for its Unicode split patterns.
ALLOWED_TOP_LEVEL = {"torch", "numpy", "PIL", "regex"} | set(sys.stdlib_module_names)
# "# copied from gpt_llama.py: rope_tables", or with "(adapted: what was left out)" after the name.
MARKER = re.compile(r"^\s*# copied from ((?:llm_machinery/)?\w+\.py): (\w+)(?: \(adapted: (.+)\))?\s*$")


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


PROJECT_MODULES = {p.stem for p in ROOT.glob("*.py")} | {"siglip", "paligemma", "train", "sample", "llm_machinery"}

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


def tokens(line):
    """Words, numbers and single punctuation characters of a line of source."""
    return re.findall(r"\w+|[^\w\s]", line)


def cut_problem(copy, original, reason):
    """Why copy is not original with cuts that the reason names, or None.

    Each line of copy is the next line of original, token for token, or a cut of it: the line with
    tokens left out, a word of the reason among them. Lines of original may be left out in runs whose
    first line holds a word of the reason. So a word or a line that the source gains later is no cut,
    and the copy cannot fall behind unnoticed (but for a line added right after a run). Blank lines do
    not count.
    """
    named = set(re.findall(r"\w+", reason))
    wanted = [tokens(line) for line in copy.splitlines() if line.strip()]
    in_run = False  # whether the line before was left out
    for line in original.splitlines():
        have = tokens(line)
        if not have:
            continue
        if wanted and (wanted[0] == have or is_cut(wanted[0], have, named)):
            wanted.pop(0)
            in_run = False
        elif in_run or named & set(have):
            in_run = True
        else:
            return f"it leaves out or changes {line.strip()!r}, which names none of '{reason}'"
    if wanted:
        return f"{' '.join(wanted[0])!r} is no line of the source with words left out"
    return None


def is_cut(short, long, named):
    """Whether short is long with tokens left out, a word of named among them."""
    rest = iter(long)
    return all(token in rest for token in short) and bool(named & set(Counter(long) - Counter(short)))


def copy_problem(path, line, source_file, name):
    """Why the copy marked at path:line differs from its source, or None when it is identical (or, when
    the marker says it is adapted, its source with parts left out)."""
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
    original, adapted = originals[name][1], MARKER.match(path.read_text().splitlines()[line - 1]).group(3)
    if not adapted:
        return None if copy == original else (f"{path.name}:{start}: {name} has drifted from {source_file}; "
                                              "copy it again or change both")
    if copy == original:
        return f"{path.name}:{line}: {name} is an exact copy; drop '(adapted: {adapted})' from the marker"
    problem = cut_problem(copy, original, adapted)
    return problem and f"{path.name}:{start}: {name} has drifted from {source_file}: {problem}; copy it again"


def test_copy_markers_are_well_formed():
    """Every `copied from` comment must use the checked form, so that none escapes the check."""
    for path in sorted(ROOT.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if "copied from" in line.lower() and "#" in line:
                assert MARKER.match(line), (f"{path.name}:{i}: write it as '# copied from <file>.py: <Name>', "
                                            "optionally followed by ' (adapted: <what was left out>)'")


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


def test_copy_check_catches_drift_in_adapted_copies(tmp_path):
    """An adapted copy may cut what its marker names. A changed, added or moved word or line fails, and so
    does a source that changes or gains words in a line the copy keeps, or gains a line: the copy would
    fall behind. An adapted copy that is in fact exact fails too."""
    source = ('def norm(x, scale=None):\n    """x halved, times scale if given."""\n    if scale is not None:\n'
              "        x = x * scale\n    return x / 2\n")
    marker = "# copied from a.py: norm (adapted: no scale)\n"
    assert MARKER.match(marker.strip()).group(3) == "no scale"
    pruned = 'def norm(x):\n    """x halved."""\n    return x / 2\n'
    cases = {  # (source, copy)
        "pruned": (source, pruned),
        "changed": (source, pruned.replace("x / 2", "x / 3")),
        "added": (source, pruned.replace("x / 2", "x / 2 + 1")),
        "swapped": (source, pruned.replace("x / 2", "2 / x")),
        "swapped in a cut": (source, pruned.replace("x halved.", "halved x.")),
        "moved": (source, 'def norm(x):\n    return x / 2\n    """x halved."""\n'),
        "cut, not named": (source, pruned.replace("x / 2", "x")),
        "source changed": (source.replace("x / 2", "x * 0.5"), pruned),
        "source gained words": (source.replace("x / 2", "x / 2.0"), pruned),
        "source gained a line": (source.replace("    if scale", "    x = x.float()\n    if scale"), pruned),
        "exact": (source, source),
    }
    verdicts = {}
    for case, (original, copy) in cases.items():
        (tmp_path / "a.py").write_text(original)
        (tmp_path / "b.py").write_text(marker + copy)
        [(path, line, source_file, name)] = marked_copies(tmp_path)
        verdicts[case] = copy_problem(path, line, source_file, name)
    assert verdicts.pop("pruned") is None
    assert "is an exact copy" in verdicts.pop("exact")
    for case, verdict in verdicts.items():
        assert verdict and "drifted" in verdict, case


@pytest.mark.parametrize("path", ["train.py", "sample.py", *(f"llm_machinery/{p.name}" for p in (ROOT / "llm_machinery").glob("*.py"))])
def test_generic_scripts_do_not_branch_on_a_model_name(path):
    """train.py, sample.py and the machinery learn what a model needs from its file, never from its name."""
    models = {"gpt_llama", "moe", "siglip", "paligemma"}
    name = path
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            literals = {c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)}
            assert not literals & models, f"{name}.py:{node.lineno} compares with a model name"
