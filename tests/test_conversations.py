"""Fine-tuning on conversations (conversations.py, chat.py): the assistant's tokens against transformers'
return_assistant_tokens_mask and TRL's labels on tiny Llama and Qwen2 folders whose tokenizers are trained
here; the batches, their order and their weights; long conversations; bad input; a tiny model that
learns to reverse words and answers in sample.py --chat; and the built-in example."""

import io
import itertools
import json
import sys
import shutil
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm_machinery import chat, conversations, corpus, data
import gpt_llama
from llm_machinery import runs
import sample
import train

from conftest import QWEN_TEMPLATE, reference, train_hf_tokenizer  # noqa: E402

transformers = reference("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
TEXT = ("Hello! How are you today? I am well, thank you. The cat sat on the mat and the dog ate its food. Be brief. "
        "Reverse these words: " + " ".join(WORDS) + ". You are a helpful assistant.\n")
# The assistant's text marked with {% generation %}, as templates written for training mark it; the same
# templates without the marks are what most folders ship.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{- message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# What the built-in formats write, marked.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FOLDERS = {  # architecture, special tokens, tokenizer_config.json, the template with marks
    "llama": ("LlamaForCausalLM", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                   "<|eot_id|>"], dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
              LLAMA3_TEMPLATE),
    "qwen2": ("Qwen2ForCausalLM", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"), QWEN_TEMPLATE),
}
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you today?"},
     {"role": "assistant", "content": "I am well, thank you."}, {"role": "user", "content": "What did the cat do?"},
     {"role": "assistant", "content": " The cat sat on the mat. "}],
    [{"role": "user", "content": "Reverse these words: red cat sun"}, {"role": "assistant", "content": "sun cat red"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How are you?"},
     {"role": "user", "content": "I am well."}, {"role": "assistant", "content": "The dog ate its food."},
     {"role": "user", "content": "Thank you."}, {"role": "assistant", "content": "You are a helpful assistant."}],
]


def unmarked(template):
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def write_hf_folder(folder, name, template, context=64, width=32):
    """A tiny random checkpoint of FOLDERS[name] with a byte-level BPE tokenizer.json that the tokenizers
    library trains here, template as chat_template.jinja (None: no template), and generation_config.json
    ending answers at the tokenizer's eos; the transformers model."""
    architecture, specials, tokenizer_config, _ = FOLDERS[name]
    tokenizer = train_hf_tokenizer(TEXT, 400, specials)
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    eos = tokenizer.token_to_id(tokenizer_config["eos_token"])
    config = config_class(vocab_size=tokenizer.get_vocab_size(), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                          tie_word_embeddings=False, eos_token_id=eos)
    model = getattr(transformers, architecture)(config).eval()
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config}))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return model


@pytest.fixture(scope="module", autouse=True)
def cache(corpus_env):
    """corpus.txt and a private data cache for every test here (conftest.corpus_env)."""
    return corpus_env


@pytest.fixture(scope="module")
def env(corpus_env):
    """The corpus folder with hf/<name>/ (the template with marks), hf/<name>-plain/ (without) and
    hf/<name>-none/ (no template) for each of FOLDERS."""
    for name, (_, _, _, template) in FOLDERS.items():
        for kind, text in (("", template), ("-plain", unmarked(template)), ("-none", None)):
            write_hf_folder(corpus_env / "hf" / f"{name}{kind}", name, text)
    return corpus_env


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def theirs(folder, messages, template):
    """(ids, assistant mask) of transformers' apply_chat_template with return_assistant_tokens_mask."""
    out = hf_tokenizer(folder).apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
    return out["input_ids"], [bool(m) for m in out["assistant_masks"]]


def ours(folder, messages):
    return chat.chat_format(folder, runs.load_tokenizer(folder)).tokens(messages)


# ------------------------------------------------------------------- the assistant's tokens


@pytest.mark.parametrize("kind", ["", "-plain"])
@pytest.mark.parametrize("name", FOLDERS)
def test_the_assistants_tokens_are_transformers_assistant_mask(env, name, kind):
    """With the template's {% generation %} marks, or without them (each assistant message is what it
    adds to the conversation before it): the ids and the mask of transformers' apply_chat_template on
    the marked template, over several turns, with and without a system prompt."""
    folder = env / "hf" / f"{name}{kind}"
    for messages in CONVERSATIONS:
        ids, scored = ours(folder, messages)
        assert (ids, scored) == theirs(folder, messages, FOLDERS[name][3])
        assert sum(scored) > 0


@pytest.mark.parametrize("name, template", [("llama", LLAMA3_TEMPLATE.replace("{{- bos_token }}", "<|begin_of_text|>")),
                                            ("qwen2", CHATML_TEMPLATE)])
def test_a_folder_without_a_template_takes_the_built_in_format_and_its_mask(env, name, template):
    folder = env / "hf" / f"{name}-none"
    for messages in CONVERSATIONS:
        assert ours(folder, messages) == theirs(folder, messages, template)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's own use of a renamed transformers argument
@pytest.mark.parametrize("name", FOLDERS)
def test_the_targets_are_trls_assistant_only_labels(env, name, tmp_path):
    """TRL's SFTTrainer with assistant_only_loss: its labels, shifted by one as the model shifts them,
    are the batch's targets, and its input ids the batch's."""
    datasets = reference("datasets")
    trl = reference("trl")
    folder = env / "hf" / name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = trl.SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to=[], max_length=None,
                           use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=config, processing_class=hf_tokenizer(folder),
                             train_dataset=datasets.Dataset.from_list([{"messages": m} for m in CONVERSATIONS]))
    expected = trainer.data_collator([trainer.train_dataset[i] for i in range(len(CONVERSATIONS))])
    rows = [tuple(map(np.array, ours(folder, m))) for m in CONVERSATIONS]
    got = conversations.batch(rows)
    for row, (ids, _) in enumerate(rows):
        n = len(ids) - 1
        assert got["idx"][row, :n].tolist() == expected["input_ids"][row, :n].tolist()
        assert got["targets"][row, :n].tolist() == expected["labels"][row, 1 : n + 1].tolist()
        assert (got["targets"][row, n:] == -100).all()
    assert got["loss_weight"] == (expected["labels"] != -100).sum()


def test_the_plain_text_format_scores_each_answer_and_its_end(tmp_path):
    """train.py's own tokenizer has no special tokens: each message ends in the byte 0x04, one token, and
    the assistant's tokens are each answer's text, trimmed, and that token."""
    import bpe

    tokenizer = bpe.train(TEXT * 5, 300)
    chat_format = chat.chat_format(None, tokenizer)
    assert chat_format.name == "the built-in plain-text format" and chat_format.end_ids == {4}
    for messages in CONVERSATIONS:
        ids, scored = chat_format.tokens(messages)
        assert ids == tokenizer.encode_ordinary(chat.plain_chat(messages, add_generation_prompt=False))
        runs_of = [list(g) for k, g in itertools.groupby(zip(ids, scored), key=lambda p: p[1]) if k]
        answers = [m["content"].strip() + "\x04" for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode([t for t, _ in run]) for run in runs_of] == answers
        # The prompt before each answer is what sample.py --chat sends for it.
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = chat_format.prompt(messages[:i])
                assert ids[: len(prompt)] == prompt and scored[len(prompt)] and not scored[len(prompt) - 1]


# ------------------------------------------------------------------------------ sources


def test_records_of_chats_are_conversations_and_text_stays_text(tmp_path):
    """Told from the first record: messages, or prompt and completion, without the text field. Parquet and
    save_to_disk folders give the conversations that .jsonl gives."""
    datasets = reference("datasets")
    records = [{"messages": m} for m in CONVERSATIONS]
    jsonl = write_jsonl(tmp_path / "chats.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "chats.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for source in (jsonl, tmp_path / "chats.parquet", tmp_path / "saved"):
        assert conversations.is_conversations(str(source))
        assert [conversations.messages_of(r, w) for w, r in corpus.records(str(source))] == CONVERSATIONS
    options = types.SimpleNamespace(data=str(write_jsonl(tmp_path / "more.jsonl", capitals(60))), text_field="text",
                                    vocab_size=300, init=None)
    assert isinstance(data.pipeline(gpt_llama, options), conversations.Conversations)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hello!", "completion": "Hi."}])
    assert conversations.is_conversations(str(pairs))
    assert conversations.messages_of({"prompt": "Hello!", "completion": "Hi."}, "") == [
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    assert conversations.messages_of({"prompt": CONVERSATIONS[0][:2], "completion": CONVERSATIONS[0][2:3]}, "") == \
        CONVERSATIONS[0][:3]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello!", "messages": CONVERSATIONS[0]}])
    (tmp_path / "plain.txt").write_text('{"messages": []}\n')
    for source in (text, tmp_path / "plain.txt"):
        assert not conversations.is_conversations(str(source))
    assert not conversations.is_conversations(None)


# ------------------------------------------------------------------------------- batches


def test_long_conversations_end_after_their_last_answer_that_fits():
    """At most context + 1 tokens: up to the end of the last answer within them, or nothing."""
    scored = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=bool)  # two answers, ending before 4 and 9
    ids = np.arange(10) + 1
    for context, end in [(8, 9), (7, 4), (3, 4), (2, None), (20, 9)]:
        kept = conversations.fit(ids, scored, context)
        assert (kept is None) if end is None else (kept[0].tolist() == ids[:end].tolist() and len(kept[1]) == end)


def test_the_log_counts_the_conversations_cut_and_dropped(tmp_path, capsys):
    long = "The cat sat on the mat and the dog ate its food. " * 4
    short = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    chats = [[*short, {"role": "user", "content": "And?"}, {"role": "assistant", "content": long}],
             [short[0], {"role": "assistant", "content": long}]]
    chats += [[{"role": "user", "content": f"Hello {i}!"}, short[1]] for i in range(18)]
    held = [corpus.is_held_out(c, 0.1) for c in chats]
    assert not held[0] and any(held)  # the records are chosen so; the split itself is tested below
    pipe = conversations.Conversations(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats])),
                                       vocab_size=300)
    capsys.readouterr()
    pipe.check(types.SimpleNamespace(max_seq_len=32))
    train_rows, val, cut, dropped = pipe.fit(32)
    assert (len(train_rows), len(val), cut, dropped) == (19 - sum(held[2:]), sum(held), 1, 1)
    ids, scored = map(np.array, pipe.format.tokens(short))
    assert train_rows[0][0].tolist() == conversations.fit(ids, scored, 32)[0].tolist()  # cut after its first exchange
    err = capsys.readouterr().err
    assert "2 of 20 conversations run past the 32-token context: 1 end after their last answer that fits, 1 are dropped" in err
    assert "no chat template, so conversations take the built-in plain-text format" in err
    assert f"{sum(held)} of 20 conversations are held out for validation (chosen by a hash of each one's content)" in err
    assert "--validation-file FILE" in err


def capitals(n):
    """n questions on capital cities cycling through ten countries, as a user's file may hold them."""
    countries = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Spain", "India", "Canada"]
    asks = ["What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
            "Tell me the capital of {}.", "{}: its capital?", "The capital of {} is which city?"]
    return [{"messages": [{"role": "user", "content": asks[i // 10 % len(asks)].format(countries[i % 10]) + " " * (i // 60)},
                          {"role": "assistant", "content": f"The capital of {countries[i % 10]}."}]} for i in range(n)]


def test_the_held_out_records_follow_their_content_not_their_order(tmp_path):
    """A file cycling through ten countries: the held-out questions cover several of them (held out by
    place, every tenth record would be on one country), the split is the same whatever the order, and
    exact duplicates fall on one side."""
    records = capitals(120)
    pipe = conversations.Conversations(str(write_jsonl(tmp_path / "c.jsonl", records)), vocab_size=300)
    held = [r["messages"] for r, h in zip(records, pipe.held) if h]
    assert 4 <= len(held) <= 24
    assert len({m[1]["content"] for m in held}) >= 5  # countries among the held-out answers
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    again = conversations.Conversations(str(write_jsonl(tmp_path / "s.jsonl", shuffled + records[:30])), vocab_size=300)
    assert sorted(map(str, held)) == sorted({str(c) for c, h in zip(again.chats, again.held) if h})
    twice = {}
    for chat_messages, h in zip(again.chats, again.held):
        twice.setdefault(str(chat_messages), set()).add(h)
    assert all(len(sides) == 1 for sides in twice.values())


def test_a_validation_file_holds_the_held_out_conversations(tmp_path, corpus_env, capsys):
    records = capitals(40)
    source, held_out = write_jsonl(tmp_path / "train.jsonl", records[:30]), write_jsonl(tmp_path / "val.jsonl", records[30:])
    pipe = conversations.Conversations(str(source), vocab_size=300, validation_source=str(held_out))
    assert pipe.held == [False] * 30 + [True] * 10 and pipe.chats == [r["messages"] for r in records]
    # A text corpus holds out its own documents: the flag is refused there, in one sentence.
    out = tmp_path / "out"
    capsys.readouterr()
    assert train.main(["--data", str(corpus_env / "corpus.txt"), "--validation-file", str(held_out), "--out", str(out),
                       "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--validation-file applies to conversations" in err and len(err.splitlines()) == 1 and not out.exists()
    for given, said in ((str(tmp_path / "nowhere.jsonl"), "no file matches --validation-file"),
                        ("", "--validation-file must name a file of held-out records")):
        assert train.main(["--data", str(source), "--validation-file", given, "--out", str(out), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1 and not out.exists(), err


def rows_of(b):
    """The rows of a batch without their padding (ids here are never 0)."""
    return [tuple(t for t in row if t) for row in b["idx"].tolist()]


def test_batches_follow_seed_and_step_and_ranks_share_a_step():
    """2 ranks of batch 2 see what 1 rank of batch 4 sees, micro-batch by micro-batch; a resumed stream
    goes on where the first left off; a step holds conversations of similar lengths, and over as many
    epochs as groups every conversation comes as often as the others."""
    examples = [(np.arange(1, 3 + k % 5) + 100 * k, np.array([0] + [1] * (1 + k % 5), dtype=bool)) for k in range(11)]

    def items(n, **kwargs):
        return list(itertools.islice(iter(conversations.ConversationStream(examples, **kwargs)), n))

    one = items(6, batch_size=4, seed=5, grad_accum=2)
    two = [items(6, batch_size=2, seed=5, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    for i in range(6):
        assert rows_of(one[i]) == rows_of(two[0][i]) + rows_of(two[1][i])
        assert one[i]["loss_weight"] == two[0][i]["loss_weight"] + two[1][i]["loss_weight"]
    resumed = items(2, batch_size=4, seed=5, grad_accum=2, start_step=2)
    assert [rows_of(b) for b in resumed] == [rows_of(b) for b in one[4:6]]
    assert [rows_of(b) for b in items(3, batch_size=4, seed=6)] != [rows_of(b) for b in items(3, batch_size=4, seed=5)]
    spread = [(np.arange(1, 2 + 9 * k % 60) + 100 * k, np.ones(1 + 9 * k % 60, dtype=bool)) for k in range(1, 30)]
    for b in itertools.islice(iter(conversations.ConversationStream(spread, batch_size=4)), conversations.GROUP_STEPS):
        lengths = [len(r) for r in rows_of(b)]  # sorted by length, give or take LENGTH_JITTER tokens
        assert all(a <= b + conversations.LENGTH_JITTER for a, b in itertools.combinations(lengths, 2))
    seen = [r for b in items(11 * conversations.GROUP_STEPS, batch_size=1) for r in rows_of(b)]
    assert set(map(seen.count, seen)) == {conversations.GROUP_STEPS}


def test_accumulation_trains_as_one_big_batch(env, tmp_path):
    """Micro-batches score different numbers of tokens; weighed by loss_weight, two micro-batches of 4
    make the step that one batch of 8 makes."""
    chats = [[{"role": "user", "content": f"Reverse these words: {' '.join(w)}"},
              {"role": "assistant", "content": " ".join(reversed(w)) * (1 + i % 4)}]
             for i, w in enumerate(itertools.islice(itertools.product(WORDS, repeat=3), 40))]
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats])
    common = ["--init", str(env / "hf" / "qwen2"), "--data", str(source), "--max-steps", "3", "--lr", "1e-2",
              "--warmup-steps", "0", "--eval-every", "0", "--sample-tokens", "0", "--no-plot", "--threads", "1",
              "--set", "max_seq_len=64"]
    assert train.main([*common, "--out", str(tmp_path / "big"), "--batch-size", "8"]) == 0
    assert train.main([*common, "--out", str(tmp_path / "acc"), "--batch-size", "4", "--grad-accum", "2"]) == 0
    # The rows are padded to other widths in the two runs, so the sums differ in rounding, which Adam's
    # division by each gradient's size may enlarge where a gradient is near 0: the steps are compared whole.
    start = gpt_llama.Model.from_pretrained(env / "hf" / "qwen2").state_dict()
    a, b = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    big, acc = (torch.cat([(w[k] - start[k]).flatten() for k in sorted(w)]) for w in (a, b))
    assert (big - acc).norm() < 1e-3 * big.norm()


# ------------------------------------------------------------------------------ bad input

BROKEN_TEMPLATES = {
    "refuses": "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
               + unmarked(CHATML_TEMPLATE),
    "no end": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}",
    "two ways": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>bot\n' }}{% endif %}",
}


@pytest.mark.parametrize("records, template, match", [
    ([{"messages": CONVERSATIONS[1]}, {"text": "Hello"}], None, "c.jsonl line 2 has no 'messages' (nor 'prompt' and"),
    ([{"messages": [{"role": "tool", "content": "42"}, *CONVERSATIONS[1]]}], None,
     "message 1 of {path} line 1 has the role 'tool'; the roles are system, user and assistant"),
    ([{"messages": [CONVERSATIONS[1][0], {"role": "assistant", "content": " "}]}], None, "is an empty assistant message"),
    ([{"messages": [CONVERSATIONS[1][0]]}], None, "line 1 has no assistant message"),
    ([{"prompt": "Hi", "completion": 42}], None, "message 2 of {path} line 1 has no 'content' holding text"),
    ([{"messages": CONVERSATIONS[0]}] * 10, "refuses", "refuses the conversation (System role not supported)"),
    ([{"messages": CONVERSATIONS[1]}] * 10, "no end", "ends an assistant message without an end-of-turn token"),
    ([{"messages": CONVERSATIONS[1]}] * 10, "two ways", "writes the start of a conversation one way before an assistant"),
])
def test_bad_conversations_are_refused_in_one_sentence(env, tmp_path, capsys, records, template, match):
    folder = tmp_path / "hf"
    shutil.copytree(env / "hf" / "qwen2", folder)
    if template:
        (folder / "chat_template.jinja").write_text(BROKEN_TEMPLATES[template])
    source = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "out"
    assert train.main(["--init", str(folder), "--data", str(source), "--out", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match.replace("{path}", str(source)) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_hugging_face_folder_without_template_nor_known_tokens_chats_in_plain_text(env, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(env / "hf" / "qwen2-none", folder)
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text.replace("<|im_start|>", "<|turn|>").replace("<|im_end|>", "<|end|>"))
    assert sample.main(["--hf", str(folder), "--chat", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert f"note: {folder} has no chat template, so conversations take the built-in plain-text format" in capsys.readouterr().err


# ------------------------------------------------------------------------ fine-tuning end to end


def reversals():
    """Every 'Reverse these words: a b c' of six words and its answer 'c b a', in a fixed shuffled order."""
    triples = list(itertools.product(WORDS[:6], repeat=3))
    order = np.random.default_rng(0).permutation(len(triples))
    return [{"messages": [{"role": "user", "content": "Reverse these words: " + " ".join(triples[i])},
                          {"role": "assistant", "content": " ".join(reversed(triples[i]))}]} for i in order]


def test_a_tiny_model_learns_to_answer_held_out_questions_in_sample_chat(env, tmp_path, capsys):
    """Fine-tuned from a random Qwen2 folder (twice the usual width) whose template has no {% generation %}
    marks, the model reverses the words of held-out questions in sample.py --chat, which it could not
    before, and stops where its turn ends: the run's folder keeps the chat template and the end-of-turn
    ids of --init. Each evaluation shows held-out questions answered beside their references."""
    folder = tmp_path / "hf"
    write_hf_folder(folder, "qwen2", unmarked(QWEN_TEMPLATE), width=64)
    records = reversals()
    source = write_jsonl(tmp_path / "reverse.jsonl", records)
    held_out = [r["messages"] for r in records if corpus.is_held_out(r["messages"], 0.1)][:8]

    def right(flags):
        n = 0
        for question, answer in held_out:
            capsys.readouterr()
            assert sample.main([*flags, "--chat", "--prompt", question["content"], "--temperature", "0",
                                "--max-new-tokens", "8"]) == 0
            n += capsys.readouterr().out == answer["content"] + "\n"
        return n

    before = right(["--hf", str(folder)])
    out = tmp_path / "out"
    assert train.main(["--init", str(folder), "--data", str(source), "--out", str(out), "--max-steps", "200",
                       "--lr", "3e-3", "--batch-size", "16", "--warmup-steps", "10", "--eval-every", "100",
                       "--log-every", "40", "--sample-tokens", "8", "--no-plot", "--threads", "1",
                       "--set", "max_seq_len=48"]) == 0
    log = capsys.readouterr().out
    after = right([str(out)])
    assert before == 0 and after >= 6, (before, after)
    for name in ("chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    evals = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert evals[-1] < evals[0] / 4
    shown = log.split("step 100 | val loss")[1].splitlines()[1:1 + conversations.N_ANSWERS]
    assert [line.split(" -> ")[0] for line in shown] == [f"  {q['content']!r}" for q, _ in held_out[:conversations.N_ANSWERS]]
    assert all("(reference " in line for line in shown)


def test_the_built_in_example_fine_tunes_a_model_trained_here(corpus_env, tmp_path, capsys, monkeypatch):
    """train.py --examples writes questions on Python's documentation; a model that train.py trained on
    text (no special tokens, no template) fine-tunes on them in the plain-text format, and sample.py
    --chat on the result asks in that format and stops at its end-of-turn byte."""
    assert train.main(["--examples", str(tmp_path / "examples")]) == 0
    source = tmp_path / "examples" / "pydoc_chats.jsonl"
    chats = [conversations.messages_of(r, w) for w, r in corpus.records(str(source))]
    assert len(chats) >= 200 and chats == [r["messages"] for r in conversations.pydoc_chats()]
    assert any(c[0]["role"] == "system" for c in chats) and any(len(c) > 3 for c in chats)
    tiny = ["--vocab-size", "300", "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
            "--set", "ffn_dim=64", "--set", "max_seq_len=128", "--batch-size", "4", "--sample-tokens", "0", "--no-plot",
            "--threads", "1", "--eval-tokens", "512"]
    base, out = tmp_path / "base", tmp_path / "tuned"
    assert train.main(["--data", str(corpus_env / "corpus.txt"), "--out", str(base), *tiny, "--max-steps", "2"]) == 0
    assert train.main(["--init", str(base), "--data", str(source), "--out", str(out), *tiny, "--max-steps", "2"]) == 0
    assert "no chat template, so conversations take the built-in plain-text format" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(sample, "continuation", lambda model, tokenizer, ids, args, device, eos_ids: (
        calls.append((ids, eos_ids)), ([], 1.0))[1])
    question = 'Explain the "pass" statement.'
    assert sample.main([str(out), "--chat", "--prompt", question, "--max-new-tokens", "4"]) == 0
    tokenizer = runs.load_tokenizer(out)
    assert calls == [(tokenizer.encode_ordinary(f"user:\n{question}\x04\nassistant:\n"), {tokenizer.encode_ordinary("\x04")[0]})]
    # Three turns on this 128-token model with the default answer budget: every prompt holds the whole
    # conversation so far, and no turn gives way.
    calls.clear()
    questions = ["What is pass?", "And else?", "And for?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q + "\n" for q in questions)))
    capsys.readouterr()
    assert sample.main([str(out), "--chat"]) == 0
    so_far = ""
    for (ids, _), question in zip(calls, questions):
        so_far += f"user:\n{question}\x04\nassistant:\n"
        assert ids == tokenizer.encode_ordinary(so_far)
        so_far += "\x04\n"  # the stand-in's answer is empty
    assert len(calls) == 3 and "gave way" not in capsys.readouterr().err
    assert len(ids) + 200 > 128  # where the old rule, which kept room for the whole default budget, dropped turns
    # The same conversations without --init, into the fine-tuned run's folder: the sentence says what --init
    # is for, and suggests no flag that would erase that run.
    assert train.main(["--data", str(source), "--out", str(out), *tiny, "--max-steps", "2"]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error.startswith("error: conversations fine-tune a model given with --init, as in python train.py --init "
                            f"out/gpt_llama --data {source}; without it, this run is a new model that does not fit the run in {out}")
    assert "--fresh" not in error and (out / "model.safetensors").exists()
