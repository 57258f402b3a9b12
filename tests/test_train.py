"""train.py end to end on a tiny config: outputs, exact resume, DDP equivalence and bad input."""

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_machinery import runs
import train

from conftest import start_train, stop_at_step  # noqa: E402

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


def test_resume_after_sigkill_and_sigint_is_bit_identical(env):
    # With dropout, so that the random state must be restored too.
    common = ["--max-steps", "24", "--ckpt-every", "8", "--eval-every", "0", "--log-every", "1", "--seed", "3",
              "--sample-tokens", "0", "--set", "dropout=0.1"]
    assert train.main(args(env, env / "straight", *common)) == 0

    out = env / "stopped"
    stop_at_step(args(env, out, *common), 10, signal.SIGKILL)  # between two checkpoints: the work since step 10 is lost
    killed_at = torch.load(out / "state.pt", weights_only=True)["step"]
    assert killed_at in (8, 16)

    code, err = stop_at_step(args(env, out, *common), killed_at + 3)
    assert code == 130, err  # 128 + SIGINT, after saving
    interrupted_at = torch.load(out / "state.pt", weights_only=True)["step"]
    assert killed_at < interrupted_at < 24

    assert train.main(args(env, out, *common)) == 0
    a, b = weights(env / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 25))  # nothing logged twice after the kill


@pytest.fixture(scope="module")
def single_batch_8(env):
    assert train.main(args(env, env / "single", *DDP_COMMON, "--batch-size", "8")) == 0
    return env / "single"


DDP_COMMON = ["--max-steps", "4", "--eval-every", "2", "--sample-tokens", "0", "--lr", "1e-3", "--seed", "1", "--log-every", "1"]


@pytest.mark.parametrize("batch, accum", [(4, 1), (2, 2)])
def test_two_ddp_processes_match_one_with_the_same_global_batch(env, single_batch_8, batch, accum):
    out = env / f"ddp{batch}x{accum}"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         *args(env, out, *DDP_COMMON, "--batch-size", str(batch), "--grad-accum", str(accum))],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = weights(single_batch_8), weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # Training losses and evaluations (each rank takes every other window, the sums are all-reduced)
    # equal the single process's.
    records = [[json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (single_batch_8, out)]
    for key in ("loss", "val_loss", "val_bpb"):
        one, two = ([r[key] for r in rs if key in r] for rs in records)
        assert len(one) == len(two) > 0 and one == pytest.approx(two, rel=1e-5), key


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
        fails(args(env, tmp_path / "o", "--max-steps", "1", "--wandb"), capsys, 'pip install -e ".[wandb]"')
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


# ------------------------------------------------------------------------------ bad input, up front


@pytest.mark.parametrize("flags, match", [
    (["--lr", "nan"], "--lr must be"), (["--lr", "-1"], "--lr must be"), (["--lr", "0"], "--lr must be"),
    (["--beta1", "2"], "--beta1 must be"), (["--beta2", "1"], "--beta2 must be"),
    (["--log-every", "0"], "--log-every must be"), (["--vocab-size", "100"], "--vocab-size must be"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be"), (["--weight-decay", "-0.1"], "--weight-decay must be"),
    (["--grad-clip", "inf"], "--grad-clip must be"), (["--warmup-steps", "-1"], "--warmup-steps must be"),
    (["--seed", "-3"], "--seed must be"), (["--eval-every", "-1"], "--eval-every must be"),
    (["--eval-tokens", "-5"], "--eval-tokens must be"), (["--ckpt-every", "-1"], "--ckpt-every must be"),
    (["--threads", "-1"], "--threads must be"), (["--workers", "0"], "--workers must be"), (["--loader-workers", "-1"], "--loader-workers must be"),
    (["--workers", "-2"], "--workers must be"), (["--text-field", " "], "--text-field must name"),
    (["--init", ""], "--init must name"),
    (["--peak-flops", "0"], "--peak-flops must be"), (["--sample-tokens", "-1"], "--sample-tokens must be"),
    (["--time-budget", "nan"], "--time-budget must be"), (["--batch-size", "0"], "--batch-size must be"),
    (["--grad-accum", "0"], "--grad-accum must be"), (["--max-steps", "0"], "--max-steps must be"),
    (["--set", "dim=-5"], "dim"), (["--set", "n_heads=0"], "n_heads"), (["--set", "max_seq_len=0"], "max_seq_len"),
    (["--set", "dropout=1.5"], "dropout"), (["--set", "dim=abc"], "dim"),
    (["--model", "moe", "--set", "dim=-5"], "dim"), (["--model", "moe", "--set", "top_k=0"], "top_k"),
    (["--set", "max_seq_len=100000"], "too few for one window"), (["--device", "tpu"], "unknown --device"),
])
def test_bad_flags_and_config_fields_fail_before_anything_is_written(env, capsys, tmp_path, flags, match):
    fails(args(env, tmp_path / "o", "--max-steps", "2", *flags), capsys, match)
    assert not (tmp_path / "o").exists()


def test_a_validation_split_shorter_than_a_window_is_found_before_training(env, capsys, tmp_path):
    # 4,000 characters of text: about 2,300 training tokens, but only about 300 for validation.
    (tmp_path / "small.txt").write_text((env / "corpus.txt").read_text()[:4000])
    argv = args(env, tmp_path / "o", "--max-steps", "50", "--set", "max_seq_len=400")
    argv[1] = str(tmp_path / "small.txt")
    fails(argv, capsys, "the validation split has")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_while_torch_imports_exits_quietly(env, tmp_path):
    proc = start_train(args(env, tmp_path / "o", "--max-steps", "5"))
    time.sleep(0.5)  # torch takes over a second to import; the script's first lines take milliseconds
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(env, capsys, tmp_path):
    out = tmp_path / "o"
    fails(args(env, out, "--max-steps", "30", "--lr", "1e30", "--warmup-steps", "0"), capsys, "no checkpoint was written")
    assert not out.exists()
    # In a folder that already holds other files, only this run's files go.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(args(env, out, "--max-steps", "30", "--lr", "1e30", "--warmup-steps", "0"), capsys, "no checkpoint was written")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def flip_byte(path, offset):
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


def test_a_flipped_byte_inside_a_tensor_is_caught(env, trained, capsys, tmp_path):
    import zipfile

    import sample

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    # state.pt is a zip archive; flip a byte in the middle of its largest tensor record (the
    # optimizer's moments), where torch.load does not look.
    with zipfile.ZipFile(out / "state.pt") as z:
        record = max(z.infolist(), key=lambda i: i.file_size)
        raw = (out / "state.pt").read_bytes()
        name_len, extra_len = int.from_bytes(raw[record.header_offset + 26: record.header_offset + 28], "little"), \
            int.from_bytes(raw[record.header_offset + 28: record.header_offset + 30], "little")
        data_start = record.header_offset + 30 + name_len + extra_len
    flip_byte(out / "state.pt", data_start + record.file_size // 2)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 20  # it still loads
    fails(args(env, out, "--max-steps", "30"), capsys, "does not match its checksum")

    shutil.copy(trained / "state.pt", out / "state.pt")
    weights_file = out / "model.safetensors"
    header = int.from_bytes(weights_file.read_bytes()[:8], "little")
    flip_byte(weights_file, 8 + header + (weights_file.stat().st_size - 8 - header) // 2)
    fails(args(env, out, "--max-steps", "30"), capsys, "does not match its checksum")
    assert sample.main([str(out), "--prompt", "The"]) == 2
    assert "does not match its checksum" in capsys.readouterr().err


@pytest.mark.parametrize("source, folder", [
    (None, "out/gpt_llama"), ("my_texts/", "out/gpt_llama-my_texts"), ("books/war and peace.txt", "out/gpt_llama-war_and_peace"),
    ("corpus/**/*.txt", "out/gpt_llama-corpus"), ("https://example.com/data/tiny.txt?raw=1", "out/gpt_llama-tiny"),
])
def test_a_run_on_other_data_gets_its_own_folder(source, folder):
    assert runs.default_out("gpt_llama", source) == Path(folder)


def test_resuming_with_another_batch_or_world_size_is_refused(env, trained, capsys, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    fails(args(env, out, "--max-steps", "30", "--batch-size", "8"), capsys, "batch size 4 (now 8)")
    fails(args(env, out, "--max-steps", "30", "--seed", "5"), capsys, "seed 0 (now 5)")


# ------------------------------------------------------------------------------ the loop's arithmetic


def test_learning_rate_schedule_values():
    a = argparse.Namespace(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    # Warmup starts at lr / warmup and reaches lr on its last step; the cosine is halfway between lr
    # and lr * min_lr_ratio at its midpoint and ends at lr * min_lr_ratio.
    assert train.lr_at(0, a, 20) == pytest.approx(2.5e-4)
    assert train.lr_at(3, a, 20) == pytest.approx(1e-3)
    assert train.lr_at(4, a, 20) == pytest.approx(1e-3)
    assert train.lr_at(12, a, 20) == pytest.approx(5.5e-4)
    assert train.lr_at(20, a, 20) == pytest.approx(1e-4)
    assert train.lr_at(16, a, 20) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.75)) / 2)


def test_the_optimizer_runs_the_logged_schedule(env, tmp_path):
    out = tmp_path / "o"
    assert train.main(args(env, out, "--max-steps", "12", "--warmup-steps", "4", "--lr", "1e-3", "--log-every", "1",
                           "--eval-every", "0", "--sample-tokens", "0")) == 0
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    # Step s (from 1) ran with the rate of index s - 1: warmup 1/4 .. 4/4, then the cosine over 8 steps.
    expected = [2.5e-4, 5e-4, 7.5e-4, 1e-3] + [1e-4 + 9e-4 * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)]
    assert lrs == pytest.approx(expected)
    state = torch.load(out / "state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([expected[-1]] * 2)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_goes_to_matrices_only(tie):
    import gpt_llama

    model = gpt_llama.Model(gpt_llama.Config(tie_embeddings=tie))
    a = argparse.Namespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95)
    groups = train.make_optimizer(model, a).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    projections = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    expected = {f"layers.{i}.{part}.{w}.weight" for i in range(2) for part, ws in
                (("attention", projections[:4]), ("feed_forward", projections[4:])) for w in ws}
    assert decayed == expected | (set() if tie else {"output.weight"})
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_moe_experts_and_router_decay_and_norms_do_not():
    import moe

    model = moe.Model(moe.Config())
    a = argparse.Namespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = train.make_optimizer(model, a).param_groups
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert plain == {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{n}_norm.weight" for i in range(model.config.n_layers) for n in ("attention", "ffn")}


def test_siglip_decays_its_kernels_but_not_the_probe_embeddings_or_norms():
    """big_vision decays kernels only; the MAP head's probe is a vector stored as (1, 1, dim)."""
    import siglip

    model = siglip.Model(siglip.Config())
    a = argparse.Namespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in train.make_optimizer(model, a).param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n
                       and "tok_embed" not in n and not n.endswith("probe")}
    assert any(n.endswith("probe") for n in names.values()) and "vision.patch_embed.weight" in decayed


def test_gradient_accumulation_equals_a_bigger_batch(env):
    common = ["--max-steps", "4", "--eval-every", "0", "--sample-tokens", "0", "--lr", "1e-3", "--seed", "2",
              "--log-every", "1"]
    assert train.main(args(env, env / "b8", *common, "--batch-size", "8")) == 0
    assert train.main(args(env, env / "b4x2", *common, "--batch-size", "4", "--grad-accum", "2")) == 0
    a, b = weights(env / "b8"), weights(env / "b4x2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    losses = [[r["loss"] for r in map(json.loads, (env / o / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for o in ("b8", "b4x2")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the mean over the step, not the sum


def test_a_run_ends_with_the_weights_of_its_lowest_validation_loss(env, tmp_path, monkeypatch, capsys):
    """Validation losses scripted by step, lowest at step 4 of 8: the run saves the weights it had at
    step 4, says so, and a run interrupted at step 6 and resumed ends with the same weights."""
    from llm_machinery import data

    scripted, kept, now = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}, {}, {}
    run_evaluate, pipe_evaluate = train.Run.evaluate, data.CausalLM.evaluate

    def at_step(self, announce=True):
        now["step"] = self.step
        return run_evaluate(self, announce)

    def scripted_loss(self, model, *rest, **kwargs):
        result = pipe_evaluate(self, model, *rest, **kwargs)
        if now["step"] == 4:
            kept.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        if now["step"] == now.get("stop_at"):
            os.kill(os.getpid(), signal.SIGINT)  # train.py saves and stops after this evaluation
        return {**result, "val_loss": scripted[now["step"]]}

    monkeypatch.setattr(train.Run, "evaluate", at_step)
    monkeypatch.setattr(data.CausalLM, "evaluate", scripted_loss)
    flags = ["--max-steps", "8", "--eval-every", "2", "--sample-tokens", "0"]
    assert train.main(args(env, tmp_path / "whole", *flags)) == 0
    log = capsys.readouterr().out
    assert "the validation loss was lowest at step 4 (1.0000), so the run ends with the weights of step 4, not those of step 8" in log
    assert all(torch.equal(kept[k], v) for k, v in weights(tmp_path / "whole").items())
    now["stop_at"] = 6
    assert train.main(args(env, tmp_path / "resumed", *flags)) == 128 + signal.SIGINT
    now["stop_at"] = None
    assert train.main(args(env, tmp_path / "resumed", *flags)) == 0
    resumed = weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[k], v) for k, v in weights(tmp_path / "whole").items())
