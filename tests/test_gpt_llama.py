"""gpt_llama.py against Hugging Face transformers' LlamaForCausalLM, plus decoding, sampling and errors."""

import json
import math

import pytest
import torch

import gpt_llama
from gpt_llama import TRAIN_RECIPE, Config, KVCache, Model, attention_reference, lm_loss, rope_tables, sample_next

from conftest import reference  # noqa: E402

transformers = reference("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def hf_model(tmp_path, arch="Llama", max_shard_size=None, dtype=torch.float32, **overrides):
    """A tiny random {arch}ForCausalLM in dtype, saved into tmp_path."""
    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**settings)
    reference = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    # A freshly built model has norm weights of one and biases of zero; random ones make a swapped
    # norm or a missing bias show up.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    reference.to(dtype)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    reference.save_pretrained(tmp_path, **kwargs)
    return reference


@pytest.mark.parametrize("case", [
    dict(),  # multi-head attention, untied
    dict(num_key_value_heads=2, tie_word_embeddings=True),  # grouped-query attention, tied
    dict(num_key_value_heads=1, head_dim=16),  # multi-query attention, head_dim != hidden_size / heads
    dict(num_key_value_heads=2, rope_parameters=dict(rope_theta=500000.0, **LLAMA3_ROPE)),  # Llama 3 scaling
    dict(arch="Qwen2", num_key_value_heads=2, tie_word_embeddings=True),  # query, key and value biases
    dict(arch="Qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0),
    # Query and key norms; an eps this large shows a norm built with another one.
    dict(arch="Qwen3", num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-3),
    dict(arch="Mistral", num_key_value_heads=2),  # its default window, 4096, is longer than the context
    dict(arch="Mistral", num_key_value_heads=2, sliding_window=8),
], ids=["mha-untied", "gqa-tied", "mqa", "llama3-rope", "qwen2", "qwen2-window", "qwen3", "mistral",
        "mistral-window"])
def test_logits_match_transformers(tmp_path, case):
    reference = hf_model(tmp_path, **case)
    model = Model.from_pretrained(tmp_path)
    assert model.config.sliding_window == (8 if "window" in str(case) else None)
    idx = torch.randint(0, 96, (2, 48))  # longer than original_max_position_embeddings = 16 and the window
    with torch.no_grad():
        expected = reference(idx).logits
    logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_the_sliding_window_changes_the_logits(tmp_path):
    """The window cases above only prove something if the window changes what the model computes."""
    hf_model(tmp_path, arch="Mistral", sliding_window=8)
    model = Model.from_pretrained(tmp_path)
    idx = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        windowed = model(idx)[0]
        for layer in model.layers:
            layer.attention.window = None
        full = model(idx)[0]
    torch.testing.assert_close(windowed[:, :8], full[:, :8], atol=1e-6, rtol=0)  # the window holds the past
    assert (windowed[:, 8:] - full[:, 8:]).abs().amax(-1).gt(1e-3).all()  # after it, every position changes


def test_llama3_scaling_changes_the_tables():
    """The scaled case above only proves something if the scaling changes the rotation angles."""
    plain = rope_tables(8, 48, 500000.0)
    scaled = rope_tables(8, 48, 500000.0, {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"})
    assert not torch.allclose(plain[0], scaled[0])


def test_sharded_checkpoint_and_older_config_layout(tmp_path):
    reference = hf_model(tmp_path, max_shard_size="20KB", num_key_value_heads=2)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    # transformers < 5 wrote rope_theta and rope_scaling at the top level instead of rope_parameters.
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = Model.from_pretrained(tmp_path)
    idx = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx).logits, atol=1e-4, rtol=0)


GENERATE_CASES = dict(llama=dict(num_key_value_heads=2), qwen2=dict(arch="Qwen2", tie_word_embeddings=True),
                      qwen3=dict(arch="Qwen3", num_key_value_heads=2, head_dim=16),
                      mistral_window=dict(arch="Mistral", num_key_value_heads=2, sliding_window=8))


@pytest.mark.parametrize("case", GENERATE_CASES.values(), ids=GENERATE_CASES.keys())
def test_greedy_generate_matches_transformers(tmp_path, case):
    reference = hf_model(tmp_path, **case)
    model = Model.from_pretrained(tmp_path)
    idx = torch.randint(3, 96, (2, 7))
    expected = reference.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(idx, 20, temperature=0), expected)
    # With an end-of-sequence token, finished rows repeat it (transformers pads them with pad_token_id).
    eos = int(expected[0, 7 + 4])
    expected = reference.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(model.generate(idx, 20, temperature=0, eos_id=eos), expected)


def test_stream_stops_when_every_row_is_done():
    torch.manual_seed(0)
    model = Model(Config()).eval()
    idx = torch.randint(0, 512, (1, 5))
    first = model.generate(idx, 1, temperature=0)[0, -1].item()
    assert len(list(model.generate_stream(idx, 10, temperature=0, eos_id=first))) == 1


@pytest.mark.parametrize("window", [None, 3, 5])  # 3: shorter than the chunk of 4 below; 5: longer
def test_kv_cache_decoding_equals_full_recomputation(window):
    torch.manual_seed(0)
    model = Model(Config(n_heads=4, n_kv_heads=2, max_seq_len=32, sliding_window=window)).eval()
    idx = torch.randint(0, 512, (2, 20))
    c = model.config
    caches = [KVCache(2, c.n_kv_heads, 20, c.head_dim, torch.float32, "cpu") for _ in model.layers]
    # a prompt, then a chunk after the cached prefix (the offset mask), then one token at a time
    pieces = [(0, 6), (6, 10)] + [(t, t + 1) for t in range(10, 20)]
    with torch.no_grad():
        for start, end in pieces:
            for layer, cache in zip(model.layers, caches):
                layer.attention.cache = cache
            cached = model(idx[:, start:end], pos=start)[0]
            for layer in model.layers:
                layer.attention.cache = None
            full = model(idx[:, :end])[0][:, start:end]  # the same positions, recomputed from scratch
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_generation_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = Model(Config())
    idx = torch.randint(0, 512, (2, 8))
    before = model(idx)[0]
    stream = model.generate_stream(idx, 5, seed=0)
    tokens = next(stream)  # a stream abandoned half-way
    assert model.training and not torch.is_inference_mode_enabled()
    model(tokens[:, None], tokens[:, None])[1].backward()  # the tokens may feed a training step
    assert all(layer.attention.cache is None for layer in model.layers)
    torch.testing.assert_close(model(idx)[0], before)


def test_attention_reference_equals_sdpa_path():
    torch.manual_seed(0)
    config = Config(dim=32, n_heads=8, n_kv_heads=2)
    attention = gpt_llama.Attention(config).eval()
    P, T, D, K = 5, 4, config.head_dim, config.n_kv_heads
    x = torch.randn(2, P + T, 32)
    cos, sin = rope_tables(D, P + T, 10000.0)
    # reference on the whole sequence with a causal mask, written out by hand
    q = gpt_llama.apply_rope(attention.wq(x).view(2, P + T, 8, D).transpose(1, 2), cos, sin)
    k = gpt_llama.apply_rope(attention.wk(x).view(2, P + T, K, D).transpose(1, 2), cos, sin)
    v = attention.wv(x).view(2, P + T, K, D).transpose(1, 2)
    mask = torch.ones(P + T, P + T, dtype=torch.bool).tril()
    expected = attention.wo(attention_reference(q, k, v, mask).transpose(1, 2).reshape(2, P + T, -1))
    with torch.no_grad():
        torch.testing.assert_close(attention(x, cos, sin), expected, atol=1e-5, rtol=0)
        # a chunk of T queries after P cached positions: the offset mask
        attention.cache = KVCache(2, K, P + T, D, torch.float32, "cpu")
        attention(x[:, :P], cos[:P], sin[:P])
        chunk = attention(x[:, P:], cos[P:], sin[P:], pos=P)
        torch.testing.assert_close(chunk, expected[:, P:], atol=1e-5, rtol=0)


def test_top_k_samples_only_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(2000, 50) * 0.5  # flat enough that an unfiltered sample would often miss
    picks = sample_next(logits, top_k=5, generator=torch.Generator().manual_seed(0))
    best = logits.topk(5, dim=-1).indices
    assert (picks[:, None] == best).any(dim=-1).all()
    assert len(set((picks[:, None] == best).float().argmax(-1).tolist())) == 5  # and all five get picked


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    picks = sample_next(logits, top_p=0.6, generator=torch.Generator().manual_seed(0))
    # 0.5 alone falls short of 0.6, so the nucleus is the two best tokens, 1 and 3
    assert set(picks.tolist()) == {1, 3}
    assert set(sample_next(logits, top_p=0.5).tolist()) == {1}


def test_low_temperature_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    assert torch.equal(sample_next(logits, temperature=1e-4), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_same_seed_same_tokens_and_global_rng_untouched():
    torch.manual_seed(0)
    model = Model(Config()).eval()
    idx = torch.randint(0, 512, (2, 4))
    state = torch.get_rng_state()
    a = model.generate(idx, 16, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(idx, 16, temperature=1.0, top_p=0.9, seed=7)
    c = model.generate(idx, 16, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loss_matches_transformers_with_padding(tmp_path):
    reference = hf_model(tmp_path)
    model = Model.from_pretrained(tmp_path)
    idx = torch.randint(0, 96, (2, 12))
    labels = idx.clone()
    labels[0, 8:] = -100  # padding
    with torch.no_grad():
        expected = reference(idx, labels=labels).loss
    # transformers shifts labels itself; we take targets already shifted by one
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    by_hand = -logits.log_softmax(-1)[targets != -100].gather(-1, targets[targets != -100][:, None]).mean()
    torch.testing.assert_close(lm_loss(logits, targets), by_hand)


def test_a_bf16_checkpoint_loads_in_bf16_without_a_copy(tmp_path, monkeypatch):
    hf_model(tmp_path, arch="Qwen2", dtype=torch.bfloat16, num_key_value_heads=2, tie_word_embeddings=True)
    tensors = gpt_llama.read_safetensors(tmp_path)
    monkeypatch.setattr(gpt_llama, "read_safetensors", lambda folder: tensors)
    model = Model.from_pretrained(tmp_path, dtype="bfloat16")
    # Each parameter is the tensor read from the file itself: no float32 model came first, and no copy.
    by_address = {t.data_ptr(): name for name, t in tensors.items()}
    params = dict(model.named_parameters())
    assert len(params) == len(tensors) and model.output.weight is model.tok_embeddings.weight
    for name, p in params.items():
        assert p.dtype == torch.bfloat16 and by_address.get(p.data_ptr()) == gpt_llama.to_hf_name(name), name
    # The RoPE tables stay float32, as in transformers, and are the real ones, not left on the meta device.
    cos, sin = rope_tables(model.config.head_dim, 64, 10000.0)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    # dtype=None keeps the float32 of old: the same numbers, widened.
    model32 = Model.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    assert all(torch.equal(p.bfloat16(), params[name]) for name, p in model32.named_parameters())


@pytest.mark.parametrize("case", [GENERATE_CASES["qwen3"], GENERATE_CASES["mistral_window"]],
                         ids=["qwen3", "mistral-window"])
def test_bf16_logits_and_greedy_tokens_equal_transformers_in_bf16(tmp_path, case):
    hf_model(tmp_path, dtype=torch.bfloat16, **case)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = Model.from_pretrained(tmp_path, dtype=torch.bfloat16)
    idx = torch.randint(0, 96, (2, 48))
    with torch.no_grad():
        expected = reference(idx).logits
        logits = model(idx)[0]
        logits32 = Model.from_pretrained(tmp_path)(idx)[0]
    # The same operations in the same order and dtype (norms in float32, RoPE tables rounded to bf16):
    # the same bits. And within bf16's rounding of what float32 weights compute.
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    torch.testing.assert_close(logits.float(), logits32, atol=2e-2, rtol=0)
    idx = torch.randint(3, 96, (4, 7))
    expected = reference.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(idx, 30, temperature=0), expected)


def test_flops_per_token_counts_every_matmul():
    model = Model(Config(vocab_size=100, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=40, max_seq_len=8,
                         tie_embeddings=False))
    per_layer = 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 40  # wq, wo; wk, wv; SwiGLU
    assert model.num_params(non_embedding=True) == 2 * (per_layer + 2 * 16) + 16
    assert model.num_params() == model.num_params(non_embedding=True) + 2 * 100 * 16
    # 6 per weight, the output head included, plus 12 * layers * heads * head_dim * context for attention
    assert model.flops_per_token() == 6 * (2 * (per_layer + 2 * 16) + 16 + 100 * 16) + 12 * 2 * 2 * 8 * 8


def test_bad_prompts_get_clear_errors():
    model = Model(Config(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="longer than the context of 16"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="longer than the context of 16"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match=r"\(batch, time\) tensor of integer token ids"):
        model.generate(torch.zeros(10, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="integer token ids"):
        model.generate(torch.zeros(1, 4), 1)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model.generate(torch.full((1, 4), 512), 1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 1, top_p=0)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Model.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Model.from_pretrained(tmp_path)
    config = dict(architectures=["GemmaForCausalLM"], model_type="gemma")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GemmaForCausalLM checkpoint; gpt_llama.py loads LlamaForCausalLM, Mistral"):
        Model.from_pretrained(tmp_path)
    llama = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    (tmp_path / "config.json").write_text(json.dumps(dict(llama, rope_parameters=dict(rope_type="yarn", factor=2.0))))
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in llama.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="lacks hidden_size"):
        Model.from_pretrained(tmp_path)
    qwen3 = dict(llama, architectures=["Qwen3ForCausalLM"], attention_bias=True)  # biases on all four projections
    (tmp_path / "config.json").write_text(json.dumps(qwen3))
    with pytest.raises(ValueError, match="gpt_llama.py does not support attention_bias"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be None, a floating-point torch dtype or its name"):
        Model.from_pretrained(tmp_path, dtype="bfloat61")
    with pytest.raises(ValueError, match="dtype must be"):
        Model.from_pretrained(tmp_path, dtype=torch.int8)


def test_a_window_in_some_layers_only_gets_a_clear_error(tmp_path):
    """Qwen2 and Qwen3 slide their window only from layer max_window_layers on; one window for all is ours."""
    hf_model(tmp_path, arch="Qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="a sliding window in 1 of 2 layers is not supported"):
        Model.from_pretrained(tmp_path)
    # Files older than transformers 5 have no layer_types: max_window_layers alone says which layers slide.
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="a sliding window in 1 of 2 layers is not supported"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, max_window_layers=2)))  # no layer slides
    assert Model.from_pretrained(tmp_path).config.sliding_window is None
    (tmp_path / "config.json").write_text(json.dumps(dict(config, max_window_layers=0, sliding_window=64)))
    assert Model.from_pretrained(tmp_path).config.sliding_window is None  # as long as the context
    (tmp_path / "config.json").write_text(json.dumps(dict(config, max_window_layers=0, use_sliding_window=False)))
    assert Model.from_pretrained(tmp_path).config.sliding_window is None  # switched off


LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
# Each a single bad value, of the kinds that `--set key=value` (ast.literal_eval) can produce; the first
# key is the field the message must name.
BAD_CONFIGS = [
    dict(vocab_size=0), dict(dim=-5), dict(dim=2.5), dict(dim="abc"), dict(dim=None), dict(n_layers=0),
    dict(n_layers=True), dict(n_heads=0), dict(n_heads=[4]), dict(n_kv_heads=0), dict(n_kv_heads=3),
    dict(n_kv_heads=8), dict(head_dim=7), dict(head_dim=0), dict(head_dim=16.0), dict(dim=66), dict(dim=36),
    dict(ffn_dim=0), dict(ffn_dim=-1), dict(max_seq_len=0), dict(max_seq_len=128.0), dict(rope_theta=0),
    dict(rope_theta=-1.0), dict(rope_theta=math.inf), dict(rope_theta=math.nan), dict(rope_theta="1e4"),
    dict(rope_scaling={"factor": 8.0}), dict(rope_scaling={**LLAMA3_SCALING, "beta_fast": 32}),
    dict(rope_scaling={**LLAMA3_SCALING, "factor": 0}), dict(rope_scaling={**LLAMA3_SCALING, "factor": True}),
    dict(rope_scaling={**LLAMA3_SCALING, "high_freq_factor": 1.0}), dict(rope_scaling=[8.0, 1.0, 4.0, 16]),
    dict(norm_eps=0), dict(norm_eps=-1e-5), dict(norm_eps=None), dict(tie_embeddings=1),
    dict(tie_embeddings="yes"), dict(dropout=1.0), dict(dropout=-0.1), dict(dropout=True), dict(dropout="0.1"),
    dict(qkv_bias=1), dict(qk_norm="yes"), dict(sliding_window=0), dict(sliding_window=8.0),
    dict(sliding_window=True),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=repr)
def test_bad_config_values_get_one_sentence_naming_the_field(bad):
    """train.py turns a ValueError from Config into one line for the user; Model is never reached."""
    with pytest.raises(ValueError) as error:
        Config(**bad)
    message = str(error.value)
    assert next(iter(bad)) in message and "\n" not in message and " must " in message


@pytest.mark.parametrize("good", [
    dict(), TRAIN_RECIPE["config"], dict(n_kv_heads=4), dict(n_kv_heads=1), dict(dim=66, head_dim=2),
    dict(dropout=0, rope_theta=500000, norm_eps=1e-6, tie_embeddings=False, rope_scaling=LLAMA3_SCALING),
    dict(qkv_bias=True, qk_norm=True, sliding_window=3),
], ids=repr)
def test_good_configs_still_build_and_run(good):
    model = Model(Config(**good))
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].isfinite().all()


@pytest.mark.parametrize("n_layers", [1, 12])
def test_initial_weights_follow_gpt2_residual_scaling(n_layers):
    """Every matrix starts as N(0, 0.02), except the two that write into the residual stream in each block
    (attention's wo, SwiGLU's w2): N(0, 0.02 / sqrt(2 * n_layers)). Norm weights start at one, biases at zero."""
    torch.manual_seed(0)
    model = Model(Config(vocab_size=1000, dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=256,
                         tie_embeddings=False, qkv_bias=True, qk_norm=True))
    residual = []
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "bias")):
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
            continue
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            residual.append(name)
            std = 0.02 / math.sqrt(2 * n_layers)
        else:
            std = 0.02
        # within five standard errors: of the sample std about std / sqrt(2 n), of the mean std / sqrt(n)
        assert p.std().item() == pytest.approx(std, rel=5 / math.sqrt(2 * p.numel())), name
        assert abs(p.mean().item()) < 5 * std / math.sqrt(p.numel()), name
    assert len(residual) == 2 * n_layers


def test_decoding_in_train_mode_equals_decoding_in_eval_mode():
    """Decoding turns dropout off whatever mode the model is in, and gives every module its own mode back."""
    torch.manual_seed(0)
    model = Model(Config(dropout=0.5)).eval()
    idx = torch.randint(0, 512, (2, 6))
    greedy = model.generate(idx, 20, temperature=0)
    sampled = model.generate(idx, 20, temperature=1.0, top_k=50, seed=0)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])  # dropout is on: the check below means something
    model.layers[1].eval()  # a mix of modes that the caller chose, to be kept
    modes = [m.training for m in model.modules()]
    assert torch.equal(model.generate(idx, 20, temperature=0), greedy)
    assert torch.equal(model.generate(idx, 20, temperature=1.0, top_k=50, seed=0), sampled)
    stream = model.generate_stream(idx, 20, temperature=0)
    assert next(stream).tolist() == greedy[:, 6].tolist()
    assert [m.training for m in model.modules()] == modes  # also between two steps of a stream
    assert torch.stack(list(stream), dim=1).tolist() == greedy[:, 7:].tolist()
    assert [m.training for m in model.modules()] == modes
