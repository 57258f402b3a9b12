"""sample.py: streaming from a trained folder, interactive prompts, Hugging Face Llama folders, bad input."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

import data
import sample
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(corpus_env):
    root = corpus_env
    argv = ["--data", str(root / "corpus.txt"), "--out", str(root / "out"), "--vocab-size", "300", "--set", "dim=32",
            "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1", "--set", "ffn_dim=64",
            "--set", "max_seq_len=32", "--batch-size", "4", "--max-steps", "3", "--sample-tokens", "0", "--no-plot", "--threads", "1"]
    assert train.main(argv) == 0
    return root / "out"


def test_prompt_is_continued_with_the_models_own_samples(trained, capsys):
    assert sample.main([str(trained), "--prompt", "The", "--max-new-tokens", "12", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err
    model, tokenizer, _ = sample.load_trained(trained)
    ids = tokenizer.encode_ordinary("The")
    expected = model.generate(torch.tensor([ids]), 12, temperature=0.8, top_k=50, seed=1)[0].tolist()
    assert out == tokenizer.decode(expected) + "\n"
    assert sample.main([str(trained), "--prompt", "The", "--max-new-tokens", "12", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out


def test_interactive_reads_prompts_until_eof(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The\n\nA \n"))
    assert sample.main([str(trained), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("The")]) == 1
    assert len([line for line in lines if line.startswith("A ")]) == 1


def test_bad_input(trained, capsys, tmp_path):
    assert sample.main([str(tmp_path / "nothing")]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    assert sample.main([str(broken), "--prompt", "The"]) == 2
    assert "cannot load the model" in capsys.readouterr().err
    # Through the command line: exit code 2 and one sentence, no traceback.
    run = subprocess.run([sys.executable, "sample.py", str(trained), "--prompt", "word " * 100], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the prompt is") and "context is 32" in lines[0]


def test_hugging_face_llama_folder_matches_transformers(tmp_path, capsys):
    import bpe
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe.train("The cat sat on the mat. The dog ate the cat's food. " * 20, 300)
    tokenizer.save(tmp_path / "tok")
    hf = tmp_path / "hf"
    n_ranks = tokenizer.n_vocab
    n_vocab = n_ranks + 256  # bpe.Tokenizer.from_llama3 adds Llama 3's 256 special tokens
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=n_ranks, eos_token_id=n_ranks + 1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf)
    shutil.copy(tmp_path / "tok" / "tokenizer.tiktoken", hf / "tokenizer.model")

    assert sample.main(["--hf", str(hf), "--prompt", "The cat", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    llama3 = bpe.Tokenizer.from_llama3(hf / "tokenizer.model")
    ids = llama3.encode_ordinary("The cat")
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()
    reference = [t for t in reference if t != n_ranks + 1]
    assert out == llama3.decode(reference) + "\n"


def test_default_length_fits_the_context_without_a_note(trained, capsys):
    assert sample.main([str(trained), "--prompt", "The", "--seed", "1"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert sample.main([str(trained), "--prompt", "The", "--seed", "1", "--max-new-tokens", "500"]) == 0
    assert "note: generating" in capsys.readouterr().err  # asked for more than the context holds


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-k", "-2"),
                                         ("--top-p", "0"), ("--top-p", "1.5"), ("--max-new-tokens", "0")])
def test_bad_sampling_flags(trained, capsys, flag, value):
    assert sample.main([str(trained), "--prompt", "The", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and "Traceback" not in err


def test_generation_stops_at_eos_and_does_not_print_it(tmp_path, capsys):
    """The folder's eos_token_id ends the answer as it ends transformers' generate, and is not printed."""
    import json

    import bpe
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe.train("The cat sat on the mat. The dog ate the cat's food. " * 20, 300)
    tokenizer.save(tmp_path / "tok")
    hf = tmp_path / "hf"
    n_ranks = tokenizer.n_vocab
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=n_ranks + 256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=n_ranks, eos_token_id=n_ranks + 1)
    model = LlamaForCausalLM(config).eval()
    ids = bpe.Tokenizer.from_llama3(tmp_path / "tok" / "tokenizer.tiktoken").encode_ordinary("The cat")
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    # The eos: an ordinary token that greedy decoding reaches for the first time after a few steps.
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] < n_ranks)
    model.generation_config.eos_token_id = free[at]
    model.config.eos_token_id = free[at]
    model.save_pretrained(hf)
    shutil.copy(tmp_path / "tok" / "tokenizer.tiktoken", hf / "tokenizer.model")
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == free[at]
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert reference == free[: at + 1]  # transformers stops there and keeps the eos

    assert sample.main(["--hf", str(hf), "--prompt", "The cat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    llama3 = bpe.Tokenizer.from_llama3(hf / "tokenizer.model")
    assert capsys.readouterr().out == llama3.decode(ids + free[:at]) + "\n"


@pytest.fixture(scope="module")
def vision_language(tmp_path_factory):
    """A paligemma.py folder trained for a few steps on the built-in shapes, and one of its pictures."""
    root = tmp_path_factory.mktemp("paligemma")
    argv = ["--model", "paligemma", "--out", str(root / "out"), "--set", "image_size=16", "--set", "patch_size=8",
            "--set", "vision_dim=16", "--set", "vision_layers=1", "--set", "vision_heads=2", "--set", "vision_mlp_dim=32",
            "--set", "dim=16", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "head_dim=8", "--set", "ffn_dim=32",
            "--set", "max_seq_len=40", "--batch-size", "8", "--max-steps", "3", "--eval-every", "0",
            "--sample-tokens", "0", "--no-plot", "--threads", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMS_FROM_SCRATCH_CACHE", str(root / "cache"))
        assert train.main(argv) == 0
    image = data.Shapes().draw(np.random.default_rng(3), "green", "square", 24)[0]
    image.save(root / "shape.png")
    return root / "out", root / "shape.png"


@pytest.mark.parametrize("seed", [0, 1])
def test_vision_language_answer_is_greedy_decoding_of_bos_prompt_newline(vision_language, capsys, seed):
    """The answer streamed for --image and --prompt is what the model, recomputed in full at every step,
    greedily writes after the image and bos + prompt + "\\n", up to eos, the way training asked."""
    import paligemma
    from PIL import Image

    folder, image = vision_language
    model, tokenizer, _ = sample.load_trained(folder)
    with torch.no_grad():  # other weights per seed, so that the answer is not always eos at once
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    bos, eos = tokenizer.special_tokens["<|bos|>"], tokenizer.special_tokens["<|eos|>"]
    prompt = "answer en what color is the shape?"
    ids = [bos] + tokenizer.encode_ordinary(prompt) + tokenizer.encode_ordinary("\n")
    pixels = paligemma.preprocess(Image.open(image), model.config.image_size)[None]
    new = []
    with torch.no_grad():
        while len(new) < 5:
            x = torch.tensor([ids + new])
            logits, _ = model(pixels, x, torch.tensor([len(ids)]))
            new.append(int(logits[0, -1].argmax()))
            if new[-1] == eos:
                new.pop()
                break
    expected = tokenizer.decode(new)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "load_trained", lambda f: (model, tokenizer, None))
        assert sample.main([str(folder), "--image", str(image), "--prompt", prompt, "--temperature", "0",
                            "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out == expected + "\n"


@pytest.mark.parametrize("flags, match", [
    ([], "give it one or more with --image"),
    (["--image", "missing.png", "--prompt", "caption en"], "cannot read the image missing.png"),
    (["--image", "{image}", "--labels", "a,b"], "does not rank captions"),
    (["--image", "{image}", "--prompt", "x " * 60], "shorten it"),
])
def test_vision_language_bad_input(vision_language, capsys, flags, match):
    folder, image = vision_language
    flags = [f.replace("{image}", str(image)) for f in flags]
    assert sample.main([str(folder), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_a_text_model_refuses_images(trained, vision_language, capsys):
    assert sample.main([str(trained), "--image", str(vision_language[1]), "--prompt", "The"]) == 2
    assert "does not read images" in capsys.readouterr().err
