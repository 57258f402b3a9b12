"""train.py --init: fine-tuning a Hugging Face checkpoint folder (a tiny random Llama with a tokenizer
trained here) or a folder train.py wrote, with the folder's own tokenizer; resume, DDP, sample.py on
the result, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bpe
import gpt_llama
from llm_machinery import runs
import sample
import train

from conftest import records, reference, stop_at_step  # noqa: E402

transformers = reference("transformers")

ROOT = Path(__file__).resolve().parent.parent
N_RANKS = 300
COMMON = ["--batch-size", "4", "--warmup-steps", "2", "--eval-tokens", "512", "--sample-tokens", "0", "--no-plot",
          "--threads", "1", "--set", "max_seq_len=32"]


@pytest.fixture(scope="module")
def env(corpus_env):
    """corpus.txt, and hf/: a random LlamaForCausalLM whose vocabulary is a BPE tokenizer's (trained
    here, saved as Llama 3's tokenizer.model) plus Llama 3's 256 special tokens."""
    root = corpus_env
    tokenizer = bpe.train((root / "corpus.txt").read_text(), N_RANKS)
    tokenizer.save(root / "tok")
    hf = root / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=N_RANKS + 256, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    shutil.copy(root / "tok" / "tokenizer.tiktoken", hf / "tokenizer.model")
    return root


def run(env, out, *extra):
    return train.main(["--init", str(env / "hf"), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON, *extra])


def test_the_training_context_is_the_recipes_not_the_checkpoints(env, tmp_path):
    """A Llama 3 checkpoint holds 8,192 positions; --init trains at the recipe's context, which a laptop
    can afford, unless --set max_seq_len asks for another."""
    folder = tmp_path / "long"
    shutil.copytree(env / "hf", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    common = COMMON[: COMMON.index("--set")]
    for extra, context in (([], gpt_llama.TRAIN_RECIPE["config"]["max_seq_len"]), (["--set", "max_seq_len=48"], 48)):
        out = tmp_path / f"o{context}"
        assert train.main(["--init", str(folder), "--data", str(env / "corpus.txt"), "--out", str(out), *common, *extra,
                           "--max-steps", "1"]) == 0
        assert json.loads((out / "config.json").read_text())["config"]["max_seq_len"] == context


def test_the_weights_and_the_tokenizer_come_from_the_folder(env):
    """With a learning rate too small to move anything, the run's weights are the checkpoint's, loaded
    by gpt_llama.py's own from_pretrained, and the token ids are those of the folder's tokenizer."""
    out = env / "still"
    assert run(env, out, "--max-steps", "1", "--lr", "1e-30", "--warmup-steps", "0") == 0
    expected = gpt_llama.Model.from_pretrained(env / "hf").state_dict()
    got = load_file(out / "model.safetensors")
    assert set(got) <= set(expected) and len(got) > 0
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-20)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "gpt_llama" and saved["config"]["max_seq_len"] == 32
    assert saved["config"]["vocab_size"] == N_RANKS + 256 and not saved["config"]["tie_embeddings"]
    assert (out / "tokenizer.model").read_bytes() == (env / "hf" / "tokenizer.model").read_bytes()
    # transformers' loss on the first validation window, through the same tokenizer, equals ours.
    text = (env / "corpus.txt").read_text()
    ids = bpe.Tokenizer.from_llama3(env / "hf" / "tokenizer.model").encode_ordinary(text[int(len(text) * 0.9):])[:33]
    reference_model = transformers.LlamaForCausalLM.from_pretrained(env / "hf").eval()
    with torch.no_grad():
        theirs = reference_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # position t scores t + 1
        model, _, _ = runs.load_run(out)
        _, ours = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_fine_tuning_lowers_the_loss_and_sample_runs_on_the_result(env, capsys):
    out = env / "tuned"
    assert run(env, out, "--max-steps", "40", "--lr", "1e-2", "--eval-every", "20", "--log-every", "1") == 0
    lines = records(out)
    losses = [r["loss"] for r in lines if "loss" in r]
    evals = [r["val_loss"] for r in lines if "val_loss" in r]
    assert losses[-1] < losses[0] - 1.0 and evals[-1] < evals[0]
    capsys.readouterr()
    assert sample.main([str(out), "--prompt", "The", "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_resume_after_sigint_is_bit_identical(env):
    common = ["--max-steps", "300", "--ckpt-every", "1000", "--eval-every", "0", "--log-every", "1", "--lr", "1e-3",
              "--seed", "3"]
    assert run(env, env / "straight", *common) == 0
    out = env / "stopped"
    argv = ["--init", str(env / "hf"), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON, *common]
    code, err = stop_at_step(argv, 3)
    assert code == 130, err  # 128 + SIGINT, after saving
    assert 3 <= torch.load(out / "state.pt", weights_only=True)["step"] < 300
    assert run(env, out, *common) == 0
    a, b = load_file(env / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_processes_match_one_with_twice_the_batch(env):
    common = ["--max-steps", "3", "--eval-every", "3", "--seed", "1", "--log-every", "1", "--lr", "1e-3"]
    assert run(env, env / "one", *common, "--batch-size", "8") == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         "--init", str(env / "hf"), "--data", str(env / "corpus.txt"), "--out", str(env / "two"), *COMMON, *common,
         "--batch-size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(env / "one" / "model.safetensors"), load_file(env / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    one, two = ([r["val_loss"] for r in records(env / o) if "val_loss" in r] for o in ("one", "two"))
    assert one == pytest.approx(two, rel=1e-6)


def test_a_train_py_folder_can_be_fine_tuned_again(env):
    out = env / "again"
    assert train.main(["--init", str(env / "still"), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON,
                       "--max-steps", "1", "--lr", "1e-30", "--warmup-steps", "0"]) == 0
    a, b = load_file(env / "still" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-20) for k in a)


@pytest.mark.parametrize("extra, match", [
    (["--init", "{env}/nowhere"], "does not exist"),
    (["--init", "{env}/hf", "--model", "moe"], "holds a gpt_llama model, not moe"),
    (["--init", "{env}/hf", "--set", "n_layers=3"], "changes the shape of the weights"),
    (["--init", "{env}/hf", "--set", "width=3"], "has no field width"),
    (["--init", "{env}/tok"], "cannot read"),
])
def test_bad_init_is_refused_in_one_sentence(env, capsys, extra, match):
    extra = [e.replace("{env}", str(env)) for e in extra]
    out = env / "refused"
    assert train.main([*extra, "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert not out.exists()


def test_resuming_from_another_init_is_refused(env, capsys):
    other = env / "hf-copy"
    shutil.copytree(env / "hf", other, dirs_exist_ok=True)
    out = env / "tuned"  # written by the fine-tuning test from hf/
    assert train.main(["--init", str(other), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON,
                       "--max-steps", "80", "--lr", "1e-2", "--eval-every", "20", "--log-every", "1"]) == 2
    assert "init" in capsys.readouterr().err


def test_a_qwen2_folder_with_a_tokenizer_json_fine_tunes(env, capsys):
    """A Qwen2 checkpoint (query, key and value biases) whose tokenizer.json the tokenizers library
    trained: before training, our loss on the first validation window, tokenized through the folder,
    equals transformers' on the ids transformers' own tokenizer gives; sample.py reads the copied
    tokenizer.json from the run's folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = env / "qwen2"
    folder.mkdir(exist_ok=True)
    text = (env / "corpus.txt").read_text()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    reference_model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in reference_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)  # fresh biases are zeros, which could not show a missing one
    reference_model.save_pretrained(folder)
    out = env / "qwen2-run"
    assert train.main(["--init", str(folder), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON,
                       "--max-steps", "1", "--lr", "1e-30", "--warmup-steps", "0"]) == 0
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    ids = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))(
        text[int(len(text) * 0.9):])["input_ids"][:33]
    model, tokenizer_ours, _ = runs.load_run(out)
    assert tokenizer_ours.encode_ordinary(text[int(len(text) * 0.9):])[:33] == ids
    with torch.no_grad():
        theirs = reference_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
        _, ours = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert sample.main([str(out), "--prompt", "The", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")
