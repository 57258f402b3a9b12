import os
import sys
from pathlib import Path

import pytest

# No test may reach a model hub; the reference models are built from configs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reference(module):
    """Import a reference library (transformers, tiktoken, ...) that a parity test compares against.

    Missing on a developer's machine, the test module is skipped; missing in CI (CI set in the
    environment), it fails, so that a broken install can never turn parity tests into green skips.
    """
    if os.environ.get("CI"):
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"CI needs the reference library {module} ({e}); install the test extras", pytrace=False)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def corpus_env(tmp_path_factory):
    """A folder with corpus.txt (the first 30k characters of pydoc topics) and a private data cache,
    which stays in force for the module, so that no test reads or fills the user's cache."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:30000])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMS_FROM_SCRATCH_CACHE", str(root / "cache"))
        yield root
