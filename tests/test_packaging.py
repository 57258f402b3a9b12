"""What `pip install .` puts at the top of site-packages: the seven files of the root and the one package,
no generic name such as data or plot that another distribution or a user's own module could hold."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOT_MODULES = {"gpt_llama", "moe", "bpe", "siglip", "paligemma", "train", "sample"}
MACHINERY = sorted(p.stem for p in (ROOT / "llm_machinery").glob("*.py") if p.stem != "__init__")


@pytest.mark.slow
def test_the_wheel_holds_the_seven_root_modules_and_the_package(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "out", "examples", "build", "__pycache__",
                                                                  "*.egg-info", ".pytest_cache", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0].removesuffix(".py") for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == ROOT_MODULES | {"llm_machinery"}
    assert {f"llm_machinery/{m}.py" for m in MACHINERY} <= set(names)


def test_the_machinerys_names_are_not_importable_from_elsewhere(tmp_path):
    """In an unrelated folder of the same environment, `import data` finds no file of this project,
    while the package's modules are found under its name."""
    code = ("import importlib.util, json, sys; names = sys.argv[1:]; "
            "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in names}))")
    run = subprocess.run([sys.executable, "-c", code, *MACHINERY, *(f"llm_machinery.{m}" for m in MACHINERY)],
                         cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    for name in MACHINERY:
        assert found[name] is None or ROOT not in Path(found[name]).resolve().parents, (name, found[name])
    if found["llm_machinery.data"] is not None:  # the project is installed in this environment
        assert Path(found["llm_machinery.data"]).resolve() == ROOT / "llm_machinery" / "data.py"
