import os
import signal
import subprocess
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


def start_train(argv, **kwargs):
    """train.py with argv in a process of its own, its stdout and stderr as text pipes."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs)


def wait_for_step(proc, step):
    """Read proc's progress lines until one reports step or later."""
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line and int(line.split()[1].split("/")[0]) >= step:
            return
    pytest.fail(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def stop_at_step(argv, step, sig=signal.SIGINT):
    """Start train.py with argv, send it sig once it has logged step, and wait: (return code, stderr)."""
    proc = start_train(argv)
    wait_for_step(proc, step)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (pytestmark = pytest.mark.usefixtures("one_thread")): a second thread
    gains nothing, and on cores that other jobs keep busy the threads of each operation wait on one
    another, which made such a file ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_on_meta(module, folder, monkeypatch):
    """module.Model.from_pretrained(folder), checking that the model was built on the meta device (its
    random initialisation touched no memory) and that the tensors read from the file became its
    parameters: the weights are never held twice."""
    import torch

    read, initialised = [], []
    read_safetensors, xavier_uniform_ = module.read_safetensors, torch.nn.init.xavier_uniform_

    def reading(folder):
        tensors = read_safetensors(folder)
        read.extend(tensors.values())
        return tensors

    def initialising(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return xavier_uniform_(tensor, *args, **kwargs)

    monkeypatch.setattr(module, "read_safetensors", reading)
    monkeypatch.setattr(torch.nn.init, "xavier_uniform_", initialising)
    model = module.Model.from_pretrained(folder)
    assert initialised and set(initialised) == {"meta"}
    assert {p.data_ptr() for p in model.parameters()} <= {t.data_ptr() for t in read}
    return model


# ChatML as Qwen2.5 writes it: a default system prompt, whitespace control; the assistant's text in
# {% generation %}, as templates made for training write it.
QWEN_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message['role'] != 'system' %}\n"
    "        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\n' }}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}\n"
    "        {{- '\n' }}\n"
    "    {%- else %}\n"
    "        {{- message['content'] + '<|im_end|>\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\n' }}\n"
    "{%- endif %}\n"
)


# The split of Qwen2's and Llama 3's tokenizer.json files, which the chat tests' tokenizers are trained with.
SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_hf_tokenizer(text, vocab_size, specials):
    """A byte-level BPE tokenizer as Qwen2 and Llama 3 lay theirs out, trained by the tokenizers library on text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text] * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tokenizer


def records(out):
    """The records of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
