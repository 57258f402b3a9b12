"""The layout that lets each file be read end to end: one concern per file, the core near the top,
generation apart from training, and no module that imports one that imports it back."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm_machinery"
MODELS = ["gpt_llama", "moe", "bpe", "siglip", "paligemma"]
# The root's files and the package's, by module name (no name is in both).
FILES = {p.stem: p for p in [*ROOT.glob("*.py"), *(ROOT / PACKAGE).glob("*.py")] if p.stem != "__init__"}


def imports(name):
    """The project's modules that FILES[name] imports, at its top or inside functions; a module of the
    package counts by its own name, as in `from llm_machinery import runs`."""
    found = set()
    for node in ast.walk(ast.parse(FILES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[-1 if a.name.startswith(PACKAGE + ".") else 0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == PACKAGE:
                found.update(a.name for a in node.names)
            else:
                found.add(node.module.split(".")[1 if node.module.startswith(PACKAGE + ".") else 0])
    return found & FILES.keys() - {name}


def test_the_root_holds_the_models_and_the_two_front_ends():
    """The root is the project's map: the five model files, train.py and sample.py; the rest is one package
    whose __init__.py is a docstring alone."""
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted([*MODELS, "train", "sample"])
    init = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
    assert len(init.body) == 1 and isinstance(init.body[0].value, ast.Constant)
    mapped = [line.split()[0] for line in ast.get_docstring(init).splitlines() if line.startswith("    ")]
    assert sorted(mapped) == sorted(f"{p.name}" for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__")


def test_model_files_import_nothing_of_the_project():
    for name in MODELS:
        assert not imports(name), name


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
