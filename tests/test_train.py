"""train.py end to end on a tiny config: outputs, exact resume, DDP equivalence and bad input."""

import importlib.util
import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--vocab-size", "300", "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
        "--set", "ffn_dim=64", "--set", "max_seq_len=32", "--set", "dropout=0.0", "--batch-size", "4", "--warmup-steps", "5",
        "--eval-tokens", "512", "--sample-tokens", "8", "--no-plot", "--threads", "1"]


@pytest.fixture(scope="module")
def env(corpus_env):
    return corpus_env


def args(env, out, *extra):
    return ["--data", str(env / "corpus.txt"), "--out", str(out), *TINY, *extra]


def weights(out):
    return load_file(Path(out) / "model.safetensors")


def subprocess_train(argv, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs)


@pytest.fixture(scope="module")
def trained(env):
    out = env / "trained"
    assert train.main(args(env, out, "--max-steps", "20", "--ckpt-every", "10", "--eval-every", "10")) == 0
    return out


def test_outputs(env, trained, capsys):
    argv = [a for a in args(env, env / "plotted", "--max-steps", "2") if a != "--no-plot"]
    assert train.main(argv) == 0  # with the plot this time
    printed = capsys.readouterr().out
    assert "sample:" in printed and "val loss" in printed and "bpb" in printed
    if importlib.util.find_spec("matplotlib"):  # the test extras install it; loss.png is optional
        assert (env / "plotted" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in printed
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.tiktoken", "state.pt", "metrics.jsonl"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["model"] == "gpt_llama" and config["config"]["dim"] == 32 and config["config"]["vocab_size"] == 300
    state = torch.load(trained / "state.pt", weights_only=True)
    assert state["step"] == 20 and state["finished"] and "optimizer" in state and "torch" in state["rng"]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 5.7  # ln(300) = 5.70: it learns
    assert all(k in records[0] for k in ("loss", "lr", "tokens_per_s", "mfu"))
    # A finished run is not trained again by the same command.
    assert train.main(args(env, trained, "--max-steps", "20")) == 0
    assert "already holds a finished run" in capsys.readouterr().out


def wait_for_step(proc, step):
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line and int(line.split()[1].split("/")[0]) >= step:
            return
    pytest.fail(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def test_resume_after_sigkill_and_sigint_is_bit_identical(env):
    # With dropout, so that the random state must be restored too.
    common = ["--max-steps", "24", "--ckpt-every", "8", "--eval-every", "0", "--log-every", "1", "--seed", "3",
              "--sample-tokens", "0", "--set", "dropout=0.1"]
    assert train.main(args(env, env / "straight", *common)) == 0

    out = env / "stopped"
    proc = subprocess_train(args(env, out, *common))
    wait_for_step(proc, 10)
    proc.send_signal(signal.SIGKILL)  # between two checkpoints: the work since step 10 is lost
    proc.wait()
    killed_at = torch.load(out / "state.pt", weights_only=True)["step"]
    assert killed_at in (8, 16)

    proc = subprocess_train(args(env, out, *common))
    wait_for_step(proc, killed_at + 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    interrupted_at = torch.load(out / "state.pt", weights_only=True)["step"]
    assert killed_at < interrupted_at < 24

    assert train.main(args(env, out, *common)) == 0
    a, b = weights(env / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 25))  # nothing logged twice after the kill


def test_two_ddp_processes_match_one_with_twice_the_batch(env):
    common = ["--max-steps", "4", "--eval-every", "0", "--sample-tokens", "0", "--lr", "1e-3", "--seed", "1"]
    assert train.main(args(env, env / "single", *common, "--batch-size", "8")) == 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         *args(env, env / "ddp", *common, "--batch-size", "4")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = weights(env / "single"), weights(env / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def fails(argv, capsys, match):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any progress note such as tokenizer training
    assert last.startswith("error: ") and match in last and "Traceback" not in err, err
    return last


def test_bad_input(env, capsys, tmp_path):
    fails(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], capsys, "no file matches")
    (tmp_path / "empty.txt").write_text("")
    fails(["--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")], capsys, "is empty")
    fails(["--model", "nosuch"], capsys, "gpt_llama")
    (tmp_path / "file").write_text("")
    fails(args(env, tmp_path / "file" / "out", "--max-steps", "1"), capsys, "cannot write to the output folder")
    fails(args(env, tmp_path / "o", "--set", "nosuch=1"), capsys, "has no field nosuch")
    try:
        import wandb  # noqa: F401
    except ImportError:
        fails(args(env, tmp_path / "o", "--max-steps", "1", "--wandb"), capsys, "pip install wandb")
    assert not (tmp_path / "o").exists()  # nothing was written for any of these


def test_not_utf8_warns_and_trains(env, capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes((env / "corpus.txt").read_text()[:8000].encode("utf-8") + b"caf\xe9\n" * 10)
    argv = args(env, tmp_path / "o", "--max-steps", "2", "--sample-tokens", "0")
    argv[1] = str(tmp_path / "latin1.txt")
    assert train.main(argv) == 0
    assert "not valid UTF-8" in capsys.readouterr().err


def test_resume_with_another_config_or_a_broken_checkpoint_fails_clearly(env, trained, capsys, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fails(args(env, out, "--max-steps", "30", "--set", "dim=48"), capsys, "dim 32 vs 48")
    (out / "model.safetensors").write_bytes(before["model.safetensors"][:1000])
    fails(args(env, out, "--max-steps", "30"), capsys, "corrupt or truncated")
    (out / "state.pt").write_bytes(before["state.pt"][: len(before["state.pt"]) // 2])
    fails(args(env, out, "--max-steps", "30"), capsys, "corrupt or truncated")
    assert (out / "state.pt").read_bytes() == before["state.pt"][: len(before["state.pt"]) // 2]  # left alone


def test_nan_loss_stops_and_keeps_the_last_checkpoint(env, trained, capsys, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = (out / "state.pt").read_bytes(), (out / "model.safetensors").read_bytes()
    err = fails(args(env, out, "--max-steps", "30", "--lr", "1e30", "--warmup-steps", "0"), capsys, "the last good checkpoint (step 20)")
    assert re.search(r"became (nan|inf) at step 2[1-9]", err), err
    assert ((out / "state.pt").read_bytes(), (out / "model.safetensors").read_bytes()) == before


def test_cli_exit_code_and_help(capsys):
    run = subprocess.run([sys.executable, "train.py", "--model", "nosuch"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: unknown model") and "Traceback" not in run.stderr
    with pytest.raises(SystemExit) as exit:
        train.main(["--help"])
    assert exit.value.code == 0
    help = capsys.readouterr().out
    for flag in ("--model", "--data", "--out", "--max-steps", "--time-budget", "--batch-size", "--lr", "--seed",
                 "--ckpt-every", "--device", "--compile", "--grad-accum", "--eval-every", "--wandb", "--set"):
        assert flag in help
