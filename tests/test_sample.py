"""sample.py: streaming from a trained folder, interactive prompts, Hugging Face Llama folders, bad input."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

from llm_machinery import images, runs
import sample
import train

from conftest import QWEN_TEMPLATE, train_hf_tokenizer  # noqa: E402

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
    model, tokenizer, _ = runs.load_run(trained)
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
    assert "nothing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert sample.main([str(tmp_path / "empty")]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert sample.main(["--hf", str(trained), "--prompt", "The"]) == 2
    assert "was written by train.py, not a Hugging Face folder; drop --hf" in capsys.readouterr().err
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
    image = images.Shapes().draw(np.random.default_rng(3), "green", "square", 24)[0]
    image.save(root / "shape.png")
    return root / "out", root / "shape.png"


@pytest.mark.parametrize("seed", [0, 1])
def test_vision_language_answer_is_greedy_decoding_of_bos_prompt_newline(vision_language, capsys, seed):
    """The answer streamed for --image and --prompt is what the model, recomputed in full at every step,
    greedily writes after the image and bos + prompt + "\\n", up to eos, the way training asked."""
    import paligemma
    from PIL import Image

    folder, image = vision_language
    model, tokenizer, _ = runs.load_run(folder)
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
        patch.setattr(runs, "load_run", lambda f: (model, tokenizer, frozenset()))
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


# ---------------------------------------------------------------- Hugging Face tokenizer.json and --chat

# Qwen2's split pattern; the tokenizer.json splits with it, then maps bytes to characters (ByteLevel).
CHAT_TEXT = "Hello! How are you today? I am well, thank you. The cat sat on the mat and the dog ate its food. Today Date: 1 Jan 2026\n"
# Llama 3's own template: bos, then each message with its header, content trimmed.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# As Llama 3.1's template writes it: a system turn with today's date (from strftime_now) first; no other.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n\n<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FOLDERS = {  # architecture, special tokens, tokenizer_config.json, chat_template.jinja
    "llama": ("LlamaForCausalLM", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                   "<|eot_id|>"],
              dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), LLAMA31_TEMPLATE),
    "qwen2": ("Qwen2ForCausalLM", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   chat_template=[{"name": "tool_use", "template": CHATML_TEMPLATE},
                                  {"name": "default", "template": QWEN_TEMPLATE}]), None),
}


def write_hf_folder(folder, name, context=128):
    """A tiny random checkpoint of FOLDERS[name] with a byte-level BPE tokenizer.json trained here, and the
    transformers model."""
    import json

    import transformers
    architecture, specials, tokenizer_config, jinja_file = FOLDERS[name]
    tokenizer = train_hf_tokenizer(CHAT_TEXT, 320, specials)
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    config = config_class(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                          tie_word_embeddings=False, eos_token_id=tokenizer.token_to_id(tokenizer_config["eos_token"]))
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}))
    if jinja_file:
        (folder / "chat_template.jinja").write_text(jinja_file)
    return model


def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def greedy(model, ids, n):
    """transformers' greedy continuation of ids, without the eos it stops at."""
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return [t for t in new if t not in (eos if isinstance(eos, list) else [eos])]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, write_hf_folder(root / name, name)) for name in FOLDERS}


@pytest.fixture
def prompts_and_answers(monkeypatch):
    """The (prompt ids, answer ids) of every answer sample.py generates."""
    calls, original = [], sample.continuation

    def spy(model, tokenizer, ids, *rest):
        new, seconds = original(model, tokenizer, ids, *rest)
        calls.append((list(ids), new))
        return new, seconds

    monkeypatch.setattr(sample, "continuation", spy)
    return calls


@pytest.mark.parametrize("name", FOLDERS)
def test_hugging_face_tokenizer_json_folder_matches_transformers(hf_folders, name, capsys, prompts_and_answers):
    folder, model = hf_folders[name]
    prompt = "The cat sat"
    assert sample.main(["--hf", str(folder), "--prompt", prompt, "--max-new-tokens", "10", "--temperature", "0"]) == 0
    tokenizer = hf_tokenizer(folder)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert prompts_and_answers == [(ids, greedy(model, ids, 10))]
    assert capsys.readouterr().out == prompt + tokenizer.decode(prompts_and_answers[0][1]) + "\n"


@pytest.mark.parametrize("name", FOLDERS)
def test_chat_turns_are_the_folders_template_with_the_conversation_so_far(hf_folders, name, capsys, monkeypatch,
                                                                          prompts_and_answers):
    """Each stdin line is a user turn; its prompt is transformers' apply_chat_template of the conversation
    so far with the generation prompt, and the answer is transformers' greedy generate."""
    folder, model = hf_folders[name]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello! How are you?\n\nWhat did the cat do?\n"))
    assert sample.main(["--hf", str(folder), "--chat", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    tokenizer = hf_tokenizer(folder)
    conversation, expected = [], []
    for question in ["Hello! How are you?", "What did the cat do?"]:
        conversation.append({"role": "user", "content": question})
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
        expected.append((ids, greedy(model, ids, 8)))
        conversation.append({"role": "assistant", "content": tokenizer.decode(expected[-1][1])})
    assert prompts_and_answers == expected
    assert capsys.readouterr().out == "".join(tokenizer.decode(new) + "\n" for _, new in expected)


def test_chat_drops_the_oldest_turns_that_no_longer_fit(hf_folders, capsys, monkeypatch, prompts_and_answers):
    folder, model = hf_folders["qwen2"]
    questions = ["Hello! How are you today?", "What did the cat do?", "And the dog?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q + "\n" for q in questions)))
    assert sample.main(["--hf", str(folder), "--chat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    tokenizer = hf_tokenizer(folder)
    prompts = [ids for ids, _ in prompts_and_answers]
    answers = [tokenizer.decode(new) for _, new in prompts_and_answers]
    kept = [[0], [0, 1], [1, 2]]  # with the first turn, the third leaves no room for 12 new tokens
    for ids, turns in zip(prompts, kept):
        conversation = [m for i in turns for m in ({"role": "user", "content": questions[i]},
                                                   {"role": "assistant", "content": answers[i]})][:-1]
        assert ids == tokenizer.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
    assert err.count("note: the conversation outgrew the 128-token context, so its oldest turn gave way") == 1
    assert f"gave way: {questions[0]!r}" in err


def test_a_short_chat_keeps_every_turn_and_the_answer_takes_what_is_left(hf_folders, capsys, monkeypatch):
    """Turns on a 128-token model, with the default answer budget (200 tokens, more than the whole context):
    each prompt holds the whole conversation so far, and each answer may take the rest. (This tokenizer
    of 320 tokens spends about 35 on a short turn; tests/test_conversations.py holds three turns.)"""
    folder, _ = hf_folders["qwen2"]
    tokenizer = hf_tokenizer(folder)
    calls = []

    def brief(model, tokenizer_, ids, args, device, eos_ids):
        calls.append((list(ids), sample.new_tokens(args, model.config.max_seq_len - len(ids), 128)))
        return tokenizer_.encode_ordinary("Fine, thanks."), 1.0

    monkeypatch.setattr(sample, "continuation", brief)
    questions = ["Hello!", "The cat?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q + "\n" for q in questions)))
    assert sample.main(["--hf", str(folder), "--chat", "--temperature", "0"]) == 0
    conversation = []
    for (ids, budget), question in zip(calls, questions):
        conversation.append({"role": "user", "content": question})
        assert ids == tokenizer.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
        assert budget == 128 - len(ids)
        conversation.append({"role": "assistant", "content": "Fine, thanks."})
    assert len(calls) == 2 and "gave way" not in capsys.readouterr().err


@pytest.mark.parametrize("name, why", [("llama", "no jinja2"), ("llama", "jinja2 3.1.5"), ("qwen2", "no template")])
def test_chat_falls_back_on_the_format_the_special_tokens_show(hf_folders, name, why, tmp_path, capsys, monkeypatch,
                                                               prompts_and_answers):
    """Without jinja2 3.1.6 or later, or without a template, Llama 3's format and ChatML are built in."""
    folder = tmp_path / name
    shutil.copytree(hf_folders[name][0], folder)
    tokenizer = hf_tokenizer(folder)
    if why == "no jinja2":
        monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 raises ImportError
    if why == "jinja2 3.1.5":
        import jinja2

        monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    if why == "no template":
        (folder / "tokenizer_config.json").unlink()
    question = [{"role": "user", "content": " What did the cat do? "}]
    assert sample.main(["--hf", str(folder), "--chat", "--prompt", question[0]["content"], "--max-new-tokens", "4",
                        "--temperature", "0"]) == 0
    monkeypatch.undo()
    # The built-in formats write what Llama 3's template (not Llama 3.1's) and plain ChatML write.
    template = LLAMA3_TEMPLATE if name == "llama" else CHATML_TEMPLATE
    expected = tokenizer.apply_chat_template(question, chat_template=template, add_generation_prompt=True)["input_ids"]
    assert prompts_and_answers[0][0] == expected
    assert ("note: without jinja2 3.1.6 or later" in capsys.readouterr().err) == (name == "llama")


def test_generation_config_eos_ids_end_the_answer(hf_folders, tmp_path, capsys):
    """generation_config.json's list of eos ids overrides config.json's eos_token_id; any of them ends the
    answer, as it ends transformers' generate, and is not printed."""
    import json

    from transformers import GenerationConfig

    folder = tmp_path / "qwen2"
    shutil.copytree(hf_folders["qwen2"][0], folder)
    model = hf_folders["qwen2"][1]
    ids = hf_tokenizer(folder)("The cat sat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    # The eos: a token that greedy decoding reaches for the first time after a few steps, listed second
    # after one that it never reaches; config.json's eos is neither.
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    never = next(t for t in range(model.config.vocab_size) if t not in free)
    assert model.config.eos_token_id not in free
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, free[at]]}))
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), generation_config=GenerationConfig.from_pretrained(folder),
                                   max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert reference == free[: at + 1]
    assert sample.main(["--hf", str(folder), "--prompt", "The cat sat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "The cat sat" + hf_tokenizer(folder).decode(free[:at]) + "\n"


@pytest.mark.parametrize("change, flags, match", [
    ("no tokenizer", [], "holds no tokenizer: neither a tokenizer.json"),
    ("unknown tokens, no jinja2", ["--chat"], "needs jinja2 3.1.6 or later"),
    ("template refuses", ["--chat", "--prompt", "Hi"], "refuses the conversation (only a system turn, please)"),
    ("templates without default", ["--chat"], "none default"),
    ("eos is text", [], "is neither a token id nor a list"),
    ("", ["--chat", "--prompt", "word " * 100], "the prompt is"),
    ("", ["--chat", "--image", "a.png"], "--chat takes text turns"),
])
def test_hugging_face_bad_input(hf_folders, tmp_path, capsys, monkeypatch, change, flags, match):
    import json

    folder = tmp_path / "qwen2"
    shutil.copytree(hf_folders["qwen2"][0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if change == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    if change.startswith("unknown tokens"):  # neither Llama 3's nor ChatML's special tokens to fall back on
        text = (folder / "tokenizer.json").read_text()
        (folder / "tokenizer.json").write_text(text.replace("<|im_start|>", "<|turn|>").replace("<|im_end|>", "<|end|>"))
    if change == "unknown tokens, no jinja2":
        monkeypatch.setitem(sys.modules, "jinja2", None)
    if change == "template refuses":
        config["chat_template"] = "{{ raise_exception('only a system turn, please') }}"
    if change == "templates without default":
        config["chat_template"] = [{"name": "tool_use", "template": QWEN_TEMPLATE}]
    if change == "eos is text":
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    if "template" in change and "no template" not in change:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert sample.main(["--hf", str(folder), *flags, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1


def test_a_run_never_taught_to_answer_says_so_and_names_the_command_that_teaches_it(trained, capsys):
    assert sample.main([str(trained), "--chat", "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert f"note: {trained} learnt from text alone and was never taught to answer" in err
    assert f"python train.py --init {trained} --data examples/pydoc_chats.jsonl" in err


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_the_output_quietly(trained):
    """sample.py ... | head -1: the reader has gone when sample.py writes. Its pipe, closed before it starts
    here so that the first write fails whatever the timing, ends sample.py with exit 0 and no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        run = subprocess.run([sys.executable, "sample.py", str(trained), "--prompt", "The", "--max-new-tokens", "5"],
                             stdout=write, stderr=subprocess.PIPE, cwd=ROOT, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write)
    assert run.returncode == 0 and "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr


def test_bf16_weights_answer_as_transformers_in_bf16(hf_folders, capsys, prompts_and_answers, tmp_path):
    """--dtype bfloat16 keeps a bf16 checkpoint's tensors as they are; the answer is transformers' greedy
    one from the same folder in bf16."""
    import transformers

    folder, _ = hf_folders["qwen2"]
    bf16 = tmp_path / "bf16"
    shutil.copytree(folder, bf16)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    reference_model.save_pretrained(bf16)
    prompt = "The cat sat"
    assert sample.main(["--hf", str(bf16), "--dtype", "bfloat16", "--prompt", prompt, "--max-new-tokens", "10",
                        "--temperature", "0"]) == 0
    ids = hf_tokenizer(bf16)(prompt, add_special_tokens=False)["input_ids"]
    assert prompts_and_answers == [(ids, greedy(reference_model, ids, 10))]
    capsys.readouterr()
    assert sample.main(["out", "--dtype", "bfloat16", "--prompt", prompt]) == 2
    assert "--dtype applies to --hf folders" in capsys.readouterr().err
