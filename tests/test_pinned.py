"""What each model's default run gives, pinned before the code that makes it was moved around.

For every model file: the sha256 of the first training batch of its default pipeline (token ids, or
pixels and ids), and after 20 steps of `train.py --model NAME` the sum and the norm of every weight,
the logged losses and the final validation metrics. Weights are compared as numbers, not by a hash of
their bytes: the same float32 arithmetic summed in another order (another CPU, another BLAS) moves
the last bits, while a real change in the data, the initialization, the optimizer or the model moves
the sums by far more than the tolerance.

`python tests/test_pinned.py [NAME ...]` rewrites tests/pinned.json from the code as it is: do it
only when a change is meant to change what a run gives, and say so in the commit. Since the pins
were taken, SigLIP's probe no longer decays (only matrices do).
"""

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PINNED = Path(__file__).with_name("pinned.json")
MODELS = ["gpt_llama", "moe", "siglip", "paligemma"]
STEPS = 20


def first_batch(name):
    """The first batch the default pipeline of model file `name` gives train.py, with seed 0."""
    from llm_machinery import data, flags, runs

    module = importlib.import_module(name)
    args = flags.parse_args(["--model", name])
    pipe = data.pipeline(module, args)
    config = runs.build_config(module, {**args.overrides, **pipe.model_config()})
    return next(iter(pipe.stream(config, args.batch_size, seed=0)))


def batch_digest(batch):
    h = hashlib.sha256()
    for key in sorted(batch):
        t = batch[key].contiguous()
        h.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def short_run(name, out):
    """Sums and norms of the weights, logged losses and final metrics after STEPS steps."""
    from safetensors.torch import load_file

    import train

    code = train.main(["--model", name, "--max-steps", str(STEPS), "--out", str(out), "--eval-every", "0",
                       "--ckpt-every", "0", "--sample-tokens", "0", "--no-plot", "--threads", "1"])
    assert code == 0
    weights = load_file(out / "model.safetensors")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "weights": {k: [v.double().sum().item(), v.double().norm().item()] for k, v in sorted(weights.items())},
        "losses": [r["loss"] for r in records if "loss" in r],
        "final": {k: v for k, v in records[-1].items() if k.startswith("val_")},
    }


def pin(name, tmp):
    return {"first_batch": batch_digest(first_batch(name)), **short_run(name, tmp / name)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.mark.parametrize("name", MODELS)
def test_the_default_run_gives_what_it_gave(name, cache, tmp_path, one_thread):
    expected = json.loads(PINNED.read_text())[name]
    got = pin(name, tmp_path)
    assert got["first_batch"] == expected["first_batch"]
    assert sorted(got["weights"]) == sorted(expected["weights"])
    for key, (total, norm) in expected["weights"].items():
        if key.endswith("k_proj.bias"):
            # Softmax ignores a bias added to every key, so its gradient is rounding noise, which Adam
            # scales up to steps of the learning rate: its value says nothing about the code.
            continue
        assert got["weights"][key] == pytest.approx([total, norm], rel=1e-4, abs=1e-5), key
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4)
    assert got["final"] == pytest.approx(expected["final"], rel=1e-4)


if __name__ == "__main__":
    import os
    import tempfile

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    names = sys.argv[1:] or MODELS
    pinned = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLMS_FROM_SCRATCH_CACHE"] = str(Path(tmp) / "cache")
        for name in names:
            pinned[name] = pin(name, Path(tmp))
            print(name, pinned[name]["first_batch"], pinned[name]["losses"])
    PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
