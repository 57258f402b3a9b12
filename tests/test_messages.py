"""Messages that tell a newcomer what happened, each read here as the user sees it."""

import json
import re
import signal
import types

import pytest
import torch

from llm_machinery import corpus, data, runs
import train

from conftest import start_train, stop_at_step  # noqa: E402

TINY = ["--vocab-size", "300", "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
        "--set", "ffn_dim=64", "--set", "max_seq_len=32", "--batch-size", "4", "--eval-tokens", "256", "--no-plot"]


def test_sizes_are_said_in_a_unit_that_shows_them():
    assert [corpus.size(n) for n in (0, 999, 12_345, 3_200_000, 4e9)] == [
        "0 bytes", "999 bytes", "12.3 KB", "3.2 MB", "4.0 GB"]
    cleaner = corpus.Cleaner()
    cleaner.duplicates, cleaner.duplicate_bytes = 50, 1234
    assert "dropped 50 duplicate documents (1.2 KB)" in cleaner.report()


def test_a_vocabulary_smaller_than_asked_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path))
    tokenizer, _ = corpus.train_tokenizer("ab ab ab cd cd", 512)
    assert tokenizer.n_vocab < 512
    assert f"the tokenizer has {tokenizer.n_vocab} tokens: that is all the pairs that repeat in this text (512 were asked for" in capsys.readouterr().err


def test_the_separator_is_named_and_ends_the_final_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    docs = [{"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20} for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    pipe = data.CausalLM(str(tmp_path / "docs.jsonl"), vocab_size=300, workers=1)
    assert "vocabulary 301 (<|endoftext|> ends each document)" in pipe.describe()
    before, after = pipe.tokenizer.encode_ordinary(" one"), pipe.tokenizer.encode_ordinary(" two")

    class Writer:  # writes " one", the separator, " two": the sample ends at the separator
        config = types.SimpleNamespace(max_seq_len=64)

        def generate(self, idx, max_new_tokens, eos_id=None, **kwargs):
            assert eos_id == pipe.separator
            return torch.cat([idx, torch.tensor([before + [pipe.separator] + after])], dim=1)

    assert pipe.demo(Writer(), "cpu", prompt="The") == "The one"


def test_a_run_stopped_by_a_signal_saves_and_exits_as_shells_expect(corpus_env, tmp_path):
    argv = ["--data", str(corpus_env / "corpus.txt"), "--out", str(tmp_path / "o"), *TINY, "--max-steps", "300",
            "--threads", "1", "--log-every", "1", "--ckpt-every", "1000", "--sample-tokens", "0"]
    code, err = stop_at_step(argv, 3, signal.SIGTERM)
    assert code == 143, err
    assert torch.load(tmp_path / "o" / "state.pt", weights_only=True)["step"] >= 3


def test_one_cpu_thread_is_singular(corpus_env, tmp_path, capsys):
    argv = ["--data", str(corpus_env / "corpus.txt"), "--out", str(tmp_path / "o"), *TINY, "--max-steps", "1",
            "--threads", "1", "--sample-tokens", "0"]
    assert train.main(argv) == 0
    assert "(1 CPU thread)" in capsys.readouterr().out


def test_an_empty_answer_is_said_and_counted(monkeypatch, capsys):
    import bpe
    from llm_machinery import runs
    import sample

    tokenizer = bpe.train("hello world, hello there", 260)

    class Silent(torch.nn.Module):  # ends its answer at once
        config = types.SimpleNamespace(max_seq_len=16)

        def generate_stream(self, idx, max_new_tokens, **kwargs):
            yield torch.tensor([7])

    monkeypatch.setattr(runs, "load_run", lambda folder: (Silent(), tokenizer, frozenset({7})))
    assert sample.main(["somewhere", "--prompt", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello\n"
    assert "(an empty answer: the model ended it at once)" in captured.err and "0 tokens in" in captured.err


def test_a_sample_of_a_streamed_corpus_ends_at_its_separator(tmp_path, monkeypatch):
    from llm_machinery import runs

    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    docs = [{"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20} for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "o"
    assert train.main(["--data", str(tmp_path / "docs.jsonl"), "--out", str(out), *TINY, "--max-steps", "1",
                       "--threads", "1", "--sample-tokens", "0", "--workers", "1"]) == 0
    _, tokenizer, ends = runs.load_run(out)
    assert ends == {tokenizer.special_tokens["<|endoftext|>"]}


def test_a_device_torch_does_not_see_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    """--device cuda (or mps) where torch sees none: one sentence and exit 2, before anything is written;
    where torch sees one, the same flag picks it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, said in (("cuda", "torch sees no CUDA GPU"), ("cuda:1", "torch sees no CUDA GPU"),
                         ("mps", "torch sees no Apple GPU")):
        out = tmp_path / device.replace(":", "_")
        assert train.main(["--data", "missing.txt", "--out", str(out), *TINY, "--max-steps", "1", "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err and "Traceback" not in err, err
        assert not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs.pick_device("cuda") == torch.device("cuda") and runs.pick_device("auto") == torch.device("cuda")


@pytest.mark.slow
def test_a_step_total_estimated_from_the_time_budget_is_marked_so(corpus_env, tmp_path):
    """step 10/~119 while the time budget sets the length; step 10/20 when --max-steps fixes it."""
    common = ["--data", str(corpus_env / "corpus.txt"), *TINY, "--threads", "1", "--log-every", "5", "--sample-tokens", "0"]
    budget = start_train([*common, "--out", str(tmp_path / "budget"), "--time-budget", "20", "--eval-every", "0"])
    out, err = budget.communicate(timeout=180)
    assert budget.returncode == 0, err
    steps = [line.split()[1] for line in out.splitlines() if line.startswith("step ") and "| loss" in line]
    assert steps and all(re.fullmatch(r"\d+/(~\d+|\?)", s) for s in steps) and any("/~" in s for s in steps), steps
    fixed = start_train([*common, "--out", str(tmp_path / "fixed"), "--max-steps", "10"])
    out, err = fixed.communicate(timeout=180)
    assert fixed.returncode == 0, err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ") and "| loss" in line] == ["5/10", "10/10"]


def test_a_misspelt_flag_gets_the_nearest_one(capsys):
    import sample

    assert train.main(["--time_budget", "60"]) == 2
    assert capsys.readouterr().err == ("error: unknown flag --time_budget (did you mean --time-budget?); "
                                       "python train.py --help lists every flag\n")
    assert sample.main(["out/x", "--promt", "Hi", "--max_new_tokens", "3"]) == 2
    assert capsys.readouterr().err == ("error: unknown flags --promt (did you mean --prompt?), --max_new_tokens (did you "
                                       "mean --max-new-tokens?); python sample.py --help lists every flag\n")
    assert train.main(["--zzzz"]) == 2 and "unknown flag --zzzz; python train.py --help" in capsys.readouterr().err
