"""Preference tuning by DPO (preferences.py): the loss, the log-probabilities, the rewards and one step's
gradients against TRL's DPOTrainer on a tiny random Llama with a Llama 3 chat template, in TRL's three
formats, with the reference precomputed, as a second model, and as peft's adapters switched off; the
loss's limits; resume, DDP and accumulation; bad input; and the built-in example."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import gpt_llama
import sample
import train
from llm_machinery import conversations, corpus, lora, preferences, runs

from conftest import ROOT, records, reference, stop_at_step  # noqa: E402
from test_conversations import LLAMA3_TEMPLATE, unmarked, write_hf_folder, write_jsonl  # noqa: E402

transformers = reference("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# (prompt, chosen, rejected): the first three ask one question, the last has a system prompt and a turn before.
PAIRS = [
    ([user("Hello! How are you today?")], [assistant("I am well, thank you.")], [assistant("The cat sat on the mat.")]),
    ([user("Reverse these words: red cat sun")], [assistant("sun cat red")], [assistant("red cat sun dog")]),
    ([user("What did the dog do?")], [assistant("The dog ate its food.")], [assistant("Hello!")]),
    ([SYSTEM, user("Hello!"), assistant("Hello! How are you?"), user("Reverse these words: blue tree")],
     [assistant("tree blue")], [assistant("You are a helpful assistant.")]),
]
FORMATS = {  # our records, and the records TRL is given for them
    "conversational": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS],
    "implicit": [{"chosen": p + c, "rejected": p + r} for p, c, r in PAIRS],
    # Text is a user message and the assistant's answers, rendered in the chat format as SFT renders
    # {"prompt", "completion"}: TRL is given the same pairs as messages.
    "standard": [{"prompt": p[0]["content"], "chosen": c[0]["content"], "rejected": r[0]["content"]} for p, c, r in PAIRS[:3]],
}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def env(corpus_env):
    """hf/: a tiny random Llama with the Llama 3 template (nothing follows its end-of-turn token, so TRL's
    completion is the answer and that token); moved/: the same model, every weight moved a little, the
    policy whose log-probabilities differ from the reference's."""
    model = write_hf_folder(corpus_env / "hf", "llama", unmarked(LLAMA3_TEMPLATE), context=128)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(corpus_env / "moved")
    return corpus_env


def their_trainer(env, tmp_path, records, mode):
    """TRL's DPOTrainer on the moved model: mode "precompute" (the reference's log-probabilities of
    hf/, precomputed as precompute_ref_log_probs does), "ref_model" (hf/ as a second model) or "peft"
    (random adapters on hf/, switched off for the reference); and its batch of every pair."""
    trl, datasets = reference("trl"), reference("datasets")
    tokenizer = transformers.AutoTokenizer.from_pretrained(env / "hf")
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, beta=0.3,
                           per_device_train_batch_size=len(records), precompute_ref_log_probs=mode == "precompute")
    base = transformers.AutoModelForCausalLM.from_pretrained(env / "hf")
    kwargs = {}
    if mode == "ref_model":
        kwargs["ref_model"] = base
        base = transformers.AutoModelForCausalLM.from_pretrained(env / "moved")
    elif mode == "peft":  # a new adapter, which TRL switches off for the reference
        peft = reference("peft")
        kwargs["peft_config"] = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = trl.DPOTrainer(model=base, args=config, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tokenizer, **kwargs)
    if mode == "peft":  # B starts at zero, which would hide a mistake in it and leave the policy where the reference is
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
    if mode == "precompute":  # the reference was computed from hf/; the policy is moved/
        trainer.model.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(env / "moved").state_dict())
    trainer.model.train()
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])


def our_pipeline(env, tmp_path, records, beta=0.3):
    options = type("Options", (), dict(data=str(write_jsonl(tmp_path / "pairs.jsonl", records)), text_field="text",
                                       init=str(env / "hf"), beta=beta))()
    model, config, tokenizer = runs.load_init(env / "hf", gpt_llama, {}, 128)
    # The same pairs again as the held-out ones, so that a few pairs make both splits.
    pipe = preferences.Preferences(options.data, tokenizer, env / "hf", beta, validation_source=options.data)
    return pipe, model


def ours(env, tmp_path, records, mode, their_model=None, beta=0.3):
    """(loss, metrics, model) of our pipeline on the same pairs and weights as their_trainer's."""
    pipe, model = our_pipeline(env, tmp_path, records, beta)
    if mode == "peft":
        lora.wrap(model, 4, 12, ("wq", "wv", "w2"))
        lora.load_adapter_state(model, {k.replace(".default", ""): v for k, v in their_model.state_dict().items()
                                        if "lora_" in k and ".default." in k}, gpt_llama.to_hf_name)
    pipe.prepare(model, torch.device("cpu"), 2, contextlib.nullcontext)
    if mode != "peft":
        model.load_state_dict(gpt_llama.Model.from_pretrained(env / "moved").state_dict())
    model.train()
    examples = [(*pipe.examples[i], None if pipe.ref is None else pipe.ref[i]) for i in range(len(records))]
    loss, metrics = pipe.loss(model, preferences.batch(examples))
    return loss, metrics, model


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_loss_logps_and_rewards_equal_trls_in_each_format(env, tmp_path, fmt):
    their_records = FORMATS["conversational"][: len(FORMATS[fmt])] if fmt == "standard" else FORMATS[fmt]
    trainer, batch = their_trainer(env, tmp_path, their_records, "precompute")
    with torch.no_grad():
        their_loss = trainer.compute_loss(trainer.model, batch)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics, _ = ours(env, tmp_path, FORMATS[fmt], "precompute")
    assert abs(theirs["rewards/margins"]) > 0.01 and 0 < theirs["rewards/accuracies"] < 1  # the policy moved
    assert loss.item() == pytest.approx(their_loss.item(), abs=1e-5)
    for k in METRICS:
        assert metrics[k].item() == pytest.approx(theirs[k], abs=1e-5 * max(1, abs(theirs[k]))), k


def gradients_equal(ours_model, their_model, names_of):
    n = 0
    for name, p in ours_model.named_parameters():
        if p.grad is None:
            continue
        theirs = their_model.get_parameter(names_of(name)).grad
        torch.testing.assert_close(p.grad, theirs, rtol=1e-4, atol=1e-6, msg=name)
        n += 1
    return n


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_one_steps_gradients_equal_trls_with_a_reference_model(env, tmp_path):
    """TRL's reference is a second model, ours precomputed: the same loss, and the same gradient of every weight."""
    records = FORMATS["conversational"]
    trainer, batch = their_trainer(env, tmp_path, records, "ref_model")
    their_loss = trainer.compute_loss(trainer.model, batch)
    their_loss.backward()
    loss, _, model = ours(env, tmp_path, records, "ref_model")
    loss.backward()
    assert loss.item() == pytest.approx(their_loss.item(), abs=1e-5)
    assert gradients_equal(model, trainer.model, gpt_llama.to_hf_name) == len(list(model.parameters()))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_one_steps_gradients_equal_trls_with_peft_adapters_switched_off(env, tmp_path):
    records = FORMATS["conversational"]
    trainer, batch = their_trainer(env, tmp_path, records, "peft")
    their_loss = trainer.compute_loss(trainer.model, batch)
    their_loss.backward()
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics, model = ours(env, tmp_path, records, "peft", trainer.model)
    loss.backward()
    assert abs(theirs["rewards/margins"]) > 0.01
    assert loss.item() == pytest.approx(their_loss.item(), abs=1e-5)
    for k in METRICS:
        assert metrics[k].item() == pytest.approx(theirs[k], abs=1e-5 * max(1, abs(theirs[k]))), k

    def peft_name(name):  # layers.0.attention.wq.lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
        layer, _, ab = name.rpartition(".")
        return f"{lora.peft_name(layer, gpt_llama.to_hf_name)}.{ab}.default.weight"

    assert gradients_equal(model, trainer.model, peft_name) == 2 * 2 * 3


# ---------------------------------------------------------------------------------- the loss's limits


def test_the_loss_at_its_limits():
    """beta -> 0: rewards 0 and the loss log 2; a policy far ahead on the chosen answers: a loss near 0;
    chosen and rejected swapped: every margin's sign flips."""
    g = torch.Generator().manual_seed(0)
    logps, ref = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    loss, m = preferences.dpo_loss(logps, ref, 1e-9)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-8) and abs(m["rewards/chosen"].item()) < 1e-7
    ahead = logps + torch.tensor([50.0] * 4 + [-50.0] * 4)
    assert preferences.dpo_loss(ahead, ref, 0.5)[0].item() < 1e-9
    _, m = preferences.dpo_loss(logps, ref, 0.1)
    swapped = preferences.dpo_loss(logps.roll(4), ref.roll(4), 0.1)[1]
    assert m["rewards/margins"].item() == pytest.approx(-swapped["rewards/margins"].item(), abs=1e-7)
    assert m["rewards/chosen"].item() == pytest.approx(swapped["rewards/rejected"].item(), abs=1e-7)
    assert m["rewards/accuracies"].item() + swapped["rewards/accuracies"].item() == 1.0


def test_swapping_chosen_and_rejected_flips_every_margin(env, tmp_path):
    records = FORMATS["conversational"]
    swapped = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]
    _, a, _ = ours(env, tmp_path, records, "precompute")
    _, b, _ = ours(env, tmp_path, swapped, "precompute")
    assert abs(a["rewards/margins"].item()) > 0.01
    assert a["rewards/margins"].item() == pytest.approx(-b["rewards/margins"].item(), abs=1e-6)
    assert a["logps/chosen"].item() == pytest.approx(b["logps/rejected"].item(), abs=1e-6)


def test_the_scored_tokens_are_the_answer_and_its_end_of_turn(env, tmp_path):
    """Of a multi-turn prompt, the earlier assistant message is not scored; of each row, the answer and
    <|eot_id|> are, and the prompt is what sample.py --chat sends."""
    pipe, _ = our_pipeline(env, tmp_path, FORMATS["conversational"])
    tokenizer = pipe.tokenizer
    for (chosen, rejected), (prompt, c, r) in zip(pipe.examples, PAIRS):
        for (ids, scored), answer in ((chosen, c), (rejected, r)):
            asked = pipe.format.prompt(prompt)
            assert ids[: len(asked)].tolist() == asked and not scored[: len(asked)].any()
            assert tokenizer.decode(ids[scored].tolist()) == answer[0]["content"] + "<|eot_id|>"


# ---------------------------------------------------------------------------------- train.py end to end

COMMON = ["--batch-size", "4", "--warmup-steps", "2", "--sample-tokens", "0", "--no-plot", "--threads", "1",
          "--set", "max_seq_len=64", "--lr", "1e-3"]


def pairs_file(env):
    """40 pairs: each question answered with its reversed words, against them in order."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    out = []
    for i in range(40):
        w = [words[(i + k * 3) % 8] for k in range(2 + i % 3)]
        out.append({"prompt": f"Reverse these words: {' '.join(w)}", "chosen": " ".join(reversed(w)), "rejected": " ".join(w)})
    return write_jsonl(env / "reverse.jsonl", out)


def run(env, out, *extra):
    return train.main(["--init", str(env / "hf"), "--data", str(pairs_file(env)), "--out", str(out), *COMMON, *extra])


def test_a_lora_run_logs_trls_metrics_and_saves_what_sample_chat_and_peft_read(env, capsys):
    out = env / "dpo-lora"
    assert run(env, out, "--lora", "4", "--max-steps", "6", "--eval-every", "3", "--log-every", "2") == 0
    log = capsys.readouterr().out
    assert "reference: adapters off" in log and "| rewards/margins " in log
    assert "(chosen '" in log and "rejected '" in log  # held-out prompts answered beside both answers
    steps = records(out)
    assert all(k in steps[0] for k in METRICS) and all(f"val_{k}" in steps[-1] for k in METRICS)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    for name in ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "chat_template.jinja"):
        assert (out / name).is_file()
    assert sample.main([str(out), "--chat", "--prompt", "Reverse these words: red cat", "--max-new-tokens", "4"]) == 0


def test_accumulation_trains_as_one_big_batch(env):
    common = ["--max-steps", "3", "--eval-every", "0", "--seed", "2"]
    assert run(env, env / "dpo-big", *common, "--batch-size", "8") == 0
    assert run(env, env / "dpo-acc", *common, "--batch-size", "4", "--grad-accum", "2") == 0
    start = gpt_llama.Model.from_pretrained(env / "hf").state_dict()
    a, b = load_file(env / "dpo-big" / "model.safetensors"), load_file(env / "dpo-acc" / "model.safetensors")
    big, acc = (torch.cat([(w[k] - start[k]).flatten() for k in sorted(w)]) for w in (a, b))
    assert big.norm() > 0 and (big - acc).norm() < 1e-4 * big.norm()
    assert records(env / "dpo-big")[-1]["val_loss"] == pytest.approx(records(env / "dpo-acc")[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(env):
    """Full fine-tuning: the reference's log-probabilities are computed again from --init on resume."""
    common = ["--max-steps", "40", "--ckpt-every", "5", "--eval-every", "0", "--log-every", "1", "--seed", "3"]
    assert run(env, env / "dpo-straight", *common) == 0
    out = env / "dpo-killed"
    argv = ["--init", str(env / "hf"), "--data", str(pairs_file(env)), "--out", str(out), *COMMON, *common]
    code, err = stop_at_step(argv, 12, signal.SIGKILL)
    assert code == -9, err
    assert 5 <= torch.load(out / "state.pt", weights_only=True)["step"] < 40
    assert run(env, out, *common) == 0
    a, b = load_file(env / "dpo-straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_ddp_processes_match_one_with_twice_the_batch(env):
    common = ["--max-steps", "3", "--eval-every", "3", "--seed", "1", "--log-every", "1"]
    assert run(env, env / "dpo-one", *common, "--batch-size", "8") == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         "--init", str(env / "hf"), "--data", str(pairs_file(env)), "--out", str(env / "dpo-two"), *COMMON, *common,
         "--batch-size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(env / o / "model.safetensors") for o in ("dpo-one", "dpo-two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    one, two = (records(env / o) for o in ("dpo-one", "dpo-two"))
    for key in ("loss", "rewards/margins", "val_loss", "val_rewards/accuracies"):
        assert [r[key] for r in one if key in r] == pytest.approx([r[key] for r in two if key in r], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------- bad input


def same(i):
    return {"prompt": f"Question {i}?", "chosen": "The same.", "rejected": "The same."}


@pytest.mark.parametrize("records_, extra, match", [
    ([same(i) for i in range(20)], [], "holds no preference pair whose answers differ (all 20 have the same chosen"),
    ([{"prompt": "Hi", "chosen": "Hello."}], [], "line 1 has no 'rejected', which every preference pair needs"),
    ([{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, {"prompt": "Hi", "rejected": "Go."}], [],
     "line 2 has no 'chosen', which every preference pair needs"),
    ([{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, {"chosen": "Hello.", "rejected": "Go."}], [],
     "line 2 has no 'prompt', so its 'chosen' and 'rejected' must be whole conversations"),
    ([{"prompt": "Hi", "chosen": [user("Hello.")], "rejected": "Go."}], [], "does not end in an assistant message"),
    (None, ["--beta", "0"], "--beta must be a positive number such as 0.1, got 0"),
    (None, ["--beta", "-1"], "--beta must be a positive number"),
    (None, ["--beta", "nan"], "--beta must be a positive number"),
    (None, ["--beta", "inf"], "--beta must be a positive number"),
    (None, ["--set", "max_seq_len=8"], "no training pair fits the 8-token context"),
])
def test_bad_pairs_are_refused_in_one_sentence(env, tmp_path, capsys, records_, extra, match):
    source = pairs_file(env) if records_ is None else write_jsonl(tmp_path / "bad.jsonl", records_)
    out = tmp_path / "out"
    assert train.main(["--init", str(env / "hf"), "--data", str(source), "--out", str(out), *COMMON, "--max-steps", "1",
                       *extra]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and match in err and "Traceback" not in err
    assert not out.exists()


def test_dpo_without_init_and_beta_without_pairs_are_refused(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main(["--data", str(pairs_file(env)), "--out", str(out), "--max-steps", "1"]) == 2
    assert "preference pairs tune a model that already answers: give --init DIR" in capsys.readouterr().err
    assert train.main(["--data", str(env / "corpus.txt"), "--out", str(out), "--max-steps", "1", "--beta", "0.2"]) == 2
    assert "--beta applies only to preference pairs" in capsys.readouterr().err
    assert not out.exists()


def test_pairs_with_the_same_answers_and_pairs_too_long_are_counted_and_skipped(env, tmp_path, capsys):
    long = {"prompt": "Reverse these words: " + "red cat " * 40, "chosen": "cat red", "rejected": "red cat"}
    good = [json.loads(line) for line in pairs_file(env).read_text().splitlines()]
    source = write_jsonl(tmp_path / "p.jsonl", good + [same(0), same(1), long])
    out = tmp_path / "out"
    assert train.main(["--init", str(env / "hf"), "--data", str(source), "--out", str(out), *COMMON, "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "2 of 43 pairs are skipped: their chosen and rejected answers are the same" in err
    assert "1 of 41 pairs are dropped: their prompt and longer answer run past the 64-token context" in err


# ---------------------------------------------------------------------------------- the built-in example


def test_the_built_in_pairs_are_the_docs_answer_against_a_neighbours(tmp_path):
    assert train.main(["--examples", str(tmp_path / "examples")]) == 0
    found = [preferences.pair_of(r, w) for w, r in corpus.records(str(tmp_path / "examples" / "pydoc_prefs.jsonl"))]
    chats = [c["messages"] for c in conversations.pydoc_chats()]
    assert len(found) >= 200 and preferences.is_preferences(str(tmp_path / "examples" / "pydoc_prefs.jsonl"))
    answers = {m["content"] for c in chats for m in c if m["role"] == "assistant"}
    chosen_ones = {chosen[0]["content"] for _, chosen, _ in found}
    for prompt, chosen, rejected in found:
        assert chosen != rejected and prompt[-1]["role"] == "user"
        assert chosen[0]["content"] in answers and rejected[0]["content"] in answers
        # No rejected answer is chosen in another pair, where held-out pairs would learn it from training.
        assert rejected[0]["content"] not in chosen_ones


def test_loss_png_draws_each_measure_for_steps_and_held_out_pairs():
    from llm_machinery import plot

    drawn, _ = plot.panels([{"step": 10, "loss": 0.6, "rewards/margins": 0.1, "lr": 1e-5},
                            {"step": 10, "val_loss": 0.7, "val_rewards/margins": 0.05},
                            {"step": 20, "loss": 0.5, "rewards/margins": 0.3, "lr": 1e-5}])
    assert drawn["rewards/margins"] == {"training": [(10, 0.1), (20, 0.3)], "validation": [(10, 0.05)]}
    for name in preferences.METRICS:  # each titled in words, with its unit
        title, unit = plot.described(name, {})
        assert " " in title and unit, name


def test_dropout_is_off_so_the_first_step_starts_at_log_2(env):
    """Policy and reference both run without dropout, as TRL's disable_dropout has it: with a dropout of 0.5
    the first step's pairs, at the --init weights, have rewards 0 and the loss log 2."""
    out = env / "dpo-dropout"
    assert run(env, out, "--set", "dropout=0.5", "--max-steps", "1", "--eval-every", "0", "--log-every", "1") == 0
    first = records(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0


def test_pairs_are_held_out_by_their_content_or_from_a_validation_file(env, tmp_path):
    """As conversations: a pair is held out by a hash of its content, whatever its place in the file; with
    --validation-file, exactly that file's pairs are."""
    countries = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Spain", "India", "Canada"]
    pairs = [{"prompt": [{"role": "user", "content": f"Capital of {countries[i % 10]}? ({i // 10})"}],
              "chosen": [{"role": "assistant", "content": f"That of {countries[i % 10]}."}],
              "rejected": [{"role": "assistant", "content": f"That of {countries[(i + 1) % 10]}."}]} for i in range(80)]
    _, _, tokenizer = runs.load_init(env / "hf", gpt_llama, {}, 128)
    pipe = preferences.Preferences(str(write_jsonl(tmp_path / "p.jsonl", pairs)), tokenizer, env / "hf")
    expected = [corpus.is_held_out((p["prompt"], p["chosen"], p["rejected"]), 0.1) for p in pairs]
    assert pipe.held == expected and 0 < sum(expected) < 20
    assert len({pairs[i]["prompt"][0]["content"].split()[2] for i, h in enumerate(expected) if h}) >= 3
    reversed_file = write_jsonl(tmp_path / "r.jsonl", pairs[::-1])
    again = preferences.Preferences(str(reversed_file), tokenizer, env / "hf")
    assert again.held == expected[::-1]
    given = preferences.Preferences(str(write_jsonl(tmp_path / "t.jsonl", pairs[:70])), tokenizer, env / "hf",
                                    validation_source=str(write_jsonl(tmp_path / "v.jsonl", pairs[70:])))
    assert given.held == [False] * 70 + [True] * 10
