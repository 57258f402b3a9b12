"""lora.py against peft's LoRA on the transformers model (forward, every adapter gradient, the merge),
and train.py --lora end to end: peft loads the run's adapters onto the transformers model, sample.py
reads its merged weights, resume is bit-exact with a bf16 base, DDP equals one process, and bad input
is refused in one sentence."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import bpe
import gpt_llama
from llm_machinery import lora
import moe
from llm_machinery import runs
import sample
import train

from conftest import records, reference, stop_at_step  # noqa: E402

transformers = reference("transformers")
peft = reference("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
R, ALPHA = 4, 12  # a scale alpha / r of 3, which r / alpha (1/3) or no scale at all would miss
N_RANKS = 300
COMMON = ["--batch-size", "4", "--warmup-steps", "2", "--eval-tokens", "512", "--sample-tokens", "0", "--no-plot",
          "--threads", "1", "--set", "max_seq_len=32"]


def tiny_hf(arch, folder, tied):
    """A random transformers Llama or Qwen2 (biases on q, k, v, made non-zero) saved in folder."""
    torch.manual_seed(0)
    kind = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = kind[0](vocab_size=N_RANKS + 256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = kind[1](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True)], ids=["llama", "qwen2-tied"])
def pair(request, tmp_path_factory):
    """Our model and peft's on the transformers model, with the same base weights and the same random
    adapters (B too, which starts at zero and would hide a mistake in it), in float32."""
    arch, tied = request.param
    folder = tiny_hf(arch, tmp_path_factory.mktemp(arch), tied)
    ours = gpt_llama.Model.from_pretrained(folder)
    lora.wrap(ours, R, ALPHA)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora.adapters(ours).values():
            m.lora_B.normal_(0.0, 0.3)
    fields = lora.adapter_config(ours, gpt_llama.to_hf_name)
    config = peft.LoraConfig(**{k: v for k, v in fields.items() if k != "peft_type"} | {"inference_mode": False})
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder), config)
    peft.set_peft_model_state_dict(theirs, lora.adapter_state(ours, gpt_llama.to_hf_name))
    return ours, theirs, folder


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, N_RANKS + 256, (2, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def test_forward_and_every_adapter_gradient_equal_peft(pair):
    ours, theirs, _ = pair
    idx, targets = batch()
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
    logits, loss = ours(idx, targets)
    their_logits = theirs(input_ids=idx).logits
    torch.testing.assert_close(logits, their_logits, rtol=0, atol=1e-5)
    loss.backward()
    F.cross_entropy(their_logits.flatten(0, 1), targets.flatten()).backward()
    found = lora.adapters(ours)
    assert len(found) == 2 * 7  # every projection of both blocks, not the output head
    for name, m in found.items():
        module = theirs.get_submodule(lora.peft_name(name, gpt_llama.to_hf_name))
        for ab in ("lora_A", "lora_B"):
            mine, reference_grad = getattr(m, ab).grad, getattr(module, ab)["default"].weight.grad
            assert mine.abs().max() > 0, (name, ab)
            torch.testing.assert_close(mine, reference_grad, rtol=0, atol=1e-5, msg=f"{name}.{ab}")
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_merged_weights_equal_peft_merge_and_unload(pair):
    ours, theirs, folder = pair
    merged = lora.merge(ours)
    assert type(merged) is gpt_llama.Model and not lora.adapters(merged)
    # peft reads the adapters from the files runs.py writes, onto a fresh transformers model, and merges.
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder),
                                              save_adapters(ours, folder.parent / f"{folder.name}-adapters"))
    reference_state = reloaded.merge_and_unload().state_dict()
    state = merged.state_dict()
    assert {gpt_llama.to_hf_name(k) for k in state} == set(reference_state)
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference_state[gpt_llama.to_hf_name(name)], rtol=0, atol=1e-6, msg=name)
    # The merged model computes what the adapted one does, which the merge left as it was.
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], ours(idx)[0], rtol=0, atol=1e-5)
        assert merged.output.weight is merged.tok_embeddings.weight or not merged.config.tie_embeddings
        torch.testing.assert_close(ours(idx)[0], theirs(input_ids=idx).logits, rtol=0, atol=1e-5)


def save_adapters(model, folder):
    """The adapters' files as runs.save_checkpoint writes them into a run folder."""
    folder.mkdir(exist_ok=True)
    runs.save_adapters(folder, model, "gpt_llama", "causal_lm", {"step": 0, "run": {}})
    return folder


def test_adapters_start_as_peft_s_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = gpt_llama.Model(gpt_llama.Config(vocab_size=64, dim=48, n_layers=2, ffn_dim=80))
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(idx)[0]
    names = lora.wrap(model, 8)
    assert len(names) == 14 and not any(n.startswith("output") for n in names)
    for name, m in lora.adapters(model).items():
        bound = 1 / math.sqrt(m.base.in_features)  # nn.Linear's own (Kaiming-uniform, a = sqrt(5)), as peft's
        assert m.scaling == 2.0 and m.lora_A.shape == (8, m.base.in_features) and m.lora_B.shape == (m.base.out_features, 8)
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound and m.lora_A.std() > 0.5 * bound
        assert not m.lora_B.any()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    optimizer = train.make_optimizer(model, train.flags.parse_args(["--max-steps", "1"]))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_targets_pick_projections_and_a_bf16_base_stays_bf16(tmp_path):
    folder = tiny_hf("llama", tmp_path / "hf", tied=True)
    model = gpt_llama.Model.from_pretrained(folder, dtype="bfloat16")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    names = lora.wrap(model, 2, targets=("wq", "w2"))
    assert [n.rsplit(".", 1)[-1] for n in names] == ["wq", "w2"] * 2
    for m in lora.adapters(model).values():
        assert m.base.weight.dtype == torch.bfloat16 and m.lora_A.dtype == m.lora_B.dtype == torch.float32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx, targets = batch()
    for _ in range(2):
        logits, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert logits.dtype == torch.bfloat16
    merged = lora.merged_state_dict(model)
    for k, v in frozen.items():
        k = k.replace(".base.", ".")
        if not any(k.startswith(n + ".") for n in names):
            assert torch.equal(merged[k], v.float()), k  # untouched, only cast
    # peft on the transformers model in bf16 keeps float32 adapters too; the outputs agree to bf16's precision.
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16),
                                            save_adapters(model, tmp_path / "adapters"))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0].float(), theirs(input_ids=idx).logits.float(), rtol=0.02, atol=0.02)


def test_moe_adapts_attention_and_shared_experts_not_the_stacked_experts():
    torch.manual_seed(0)
    config = moe.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                        expert_dim=16, n_shared_experts=1, shared_expert_dim=16, bias_update_rate=0.01)
    model = moe.Model(config)
    names = lora.wrap(model, 2)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    assert all(".shared." in n for n in names if n.endswith(("w1", "w2", "w3")))
    assert not model.layers[0].feed_forward.gate_up.requires_grad
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.normal_(0.0, 0.3)
    model.eval()
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(lora.merge(model)(idx)[0], model(idx)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda m: lora.wrap(m, 0), "rank must be a positive integer"),
    (lambda m: lora.wrap(m, -4), "rank must be a positive integer"),
    (lambda m: lora.wrap(m, 2.5), "rank must be a positive integer"),
    (lambda m: lora.wrap(m, 4, float("nan")), "alpha must be a positive number"),
    (lambda m: lora.wrap(m, 4, -8), "alpha must be a positive number"),
    (lambda m: lora.wrap(m, 4, targets=("wq", "xq")), "no linear layer called xq; LoRA can adapt wq, wk, wv, wo, w1, w3, w2"),
    (lambda m: lora.wrap(nn.Sequential(nn.Linear(4, 4)), 4), "no linear layer in a stack of blocks"),
    (lambda m: lora.wrap(m, 4) and lora.wrap(m, 4), "already carries LoRA adapters"),
])
def test_bad_arguments_are_one_sentence(call, match):
    model = gpt_llama.Model(gpt_llama.Config())
    with pytest.raises(ValueError, match=match):
        call(model)


# -------------------------------------------------------------------------------------- train.py --lora


@pytest.fixture(scope="module")
def env(corpus_env):
    """corpus.txt and hf/: a random tied Llama whose vocabulary is a BPE tokenizer's trained here."""
    root = corpus_env
    tokenizer = bpe.train((root / "corpus.txt").read_text(), N_RANKS)
    tokenizer.save(root / "tok")
    tiny_hf("llama", root / "hf", tied=True)
    shutil.copy(root / "tok" / "tokenizer.tiktoken", root / "hf" / "tokenizer.model")
    return root


def run(env, out, *extra):
    return train.main(["--init", str(env / "hf"), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON, *extra])


def test_a_lora_run_saves_merged_weights_for_sample_py_and_adapters_for_peft(env, capsys):
    out = env / "lora"
    assert run(env, out, "--lora", "4", "--max-steps", "10", "--lr", "1e-2") == 0
    assert "LoRA rank 4, alpha 8, on 14 layers" in capsys.readouterr().out
    # The frozen tensors are the checkpoint's, bit for bit; the adapted ones moved.
    start, saved = gpt_llama.Model.from_pretrained(env / "hf").state_dict(), load_file(out / "model.safetensors")
    assert set(saved) <= set(start)
    for name, tensor in saved.items():
        adapted = any(f".{p}." in name for p in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
        assert torch.equal(tensor, start[name]) != adapted, name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str((env / "hf").resolve())
    # peft puts the saved adapters on transformers' model; it computes what our merged weights do.
    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(env / "hf"), out).eval()
    model, _, _ = runs.load_run(out)
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(idx[:, :16])[0], theirs(input_ids=idx[:, :16]).logits, rtol=0, atol=1e-5)
    assert sample.main([str(out), "--prompt", "The", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_resume_after_sigint_is_bit_identical_with_a_bf16_base(env):
    common = ["--lora", "4", "--dtype", "bfloat16", "--max-steps", "300", "--ckpt-every", "1000", "--eval-every", "0",
              "--log-every", "1", "--lr", "1e-3", "--seed", "3"]
    assert run(env, env / "lora-straight", *common) == 0
    out = env / "lora-stopped"
    argv = ["--init", str(env / "hf"), "--data", str(env / "corpus.txt"), "--out", str(out), *COMMON, *common]
    code, err = stop_at_step(argv, 3)
    assert code == 130, err  # 128 + SIGINT, after saving
    assert 3 <= torch.load(out / "state.pt", weights_only=True)["step"] < 300
    assert run(env, out, *common) == 0
    for name in ("adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(env / "lora-straight" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_ddp_processes_match_one_with_twice_the_batch(env):
    common = ["--lora", "4", "--max-steps", "3", "--eval-every", "3", "--seed", "1", "--log-every", "1", "--lr", "1e-2"]
    assert run(env, env / "lora-one", *common, "--batch-size", "8") == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         "--init", str(env / "hf"), "--data", str(env / "corpus.txt"), "--out", str(env / "lora-two"), *COMMON, *common,
         "--batch-size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(env / o / "adapter_model.safetensors") for o in ("lora-one", "lora-two"))
    assert a.keys() == b.keys() and all(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    one, two = ([r["val_loss"] for r in records(env / o) if "val_loss" in r] for o in ("lora-one", "lora-two"))
    assert one == pytest.approx(two, rel=1e-6)


@pytest.mark.parametrize("extra, match", [
    (["--lora", "0"], "--lora must be a positive rank such as 16, got 0"),
    (["--lora", "-2"], "--lora must be a positive rank"),
    (["--lora", "abc"], "--lora must be a positive rank"),
    (["--lora", "4", "--lora-alpha", "nan"], "--lora-alpha must be a positive number"),
    (["--lora", "4", "--lora-alpha", "abc"], "--lora-alpha must be a positive number"),
    (["--lora", "4", "--lora-alpha", "-8"], "--lora-alpha must be a positive number"),
    (["--lora", "4", "--lora-targets", "wq,xq"], "no linear layer called xq; LoRA can adapt wq, wk"),
    (["--lora-alpha", "8"], "--lora-alpha applies only with --lora"),
    (["--dtype", "bfloat16"], "--dtype bfloat16 applies only with --lora"),
    (["--lora", "8"], "holds a run with lora rank 4, alpha 8, all layers, float32 (now rank 8, alpha 16"),
])
def test_bad_lora_input_is_refused_in_one_sentence(env, capsys, extra, match):
    out = env / "lora" if "holds" in match else env / "refused"  # the first: the finished run above, resumed
    assert run(env, out, *extra, "--max-steps", "20") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (env / "refused").exists()


def test_lora_without_init_is_refused(env, capsys):
    assert train.main(["--data", str(env / "corpus.txt"), "--out", str(env / "refused"), "--lora", "4"]) == 2
    err = capsys.readouterr().err
    assert "--lora adapts a pretrained model: give --init DIR" in err and not (env / "refused").exists()
