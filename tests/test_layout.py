"""The layout that lets each file be read end to end: one concern per file, the core near the top,
generation apart from training, and no module that imports one that imports it back."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(name):
    """The project's modules that FILES[name] imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(FILES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & FILES.keys() - {name}


def reachable(name):
    seen, todo = set(), [name]
    while todo:
        for other in imports(todo.pop()) - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_generation_does_not_depend_on_the_trainer():
    assert "train" not in reachable("sample")


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_module_imports_one_that_imports_it_back(name):
    assert name not in reachable(name)


def first_line(path, prefix):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.lstrip().startswith(prefix))


def test_files_are_a_few_hundred_lines_and_start_with_their_core():
    lengths = {name: len(path.read_text().splitlines()) for name, path in FILES.items()}
    assert max(lengths.values()) <= 900, lengths
    assert lengths["train"] <= 700 and first_line(FILES["train"], "def train(") <= 300
    assert first_line(FILES["train"], "def make_optimizer(") <= 300 and first_line(FILES["train"], "def lr_at(") <= 300
    assert first_line(FILES["train"], "def train_step(") <= 300
    assert lengths["bpe"] <= 700
    for core in ("def train(", "def encode(", "def decode("):
        assert first_line(FILES["bpe"], core) <= 400, core
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
