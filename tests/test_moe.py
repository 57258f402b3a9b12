"""moe.py against transformers' Mixtral and Qwen2-MoE; its dispatch and balancing against hand-written references."""

import json
import math

import pytest
import torch

import moe

from conftest import reference  # noqa: E402

transformers = reference("transformers")

VOCAB, E, K = 96, 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def tiny_hf(kind, folder, max_shard_size=None):
    """A randomly initialised transformers model, its weights drawn large enough to route unevenly."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=K, max_position_embeddings=64, router_aux_loss_coef=0.02,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=E, **common)
        model = transformers.MixtralForCausalLM(config)
    else:
        # Layer 0 dense, layer 1 sparse; an unnormalised top-k and a gated shared expert.
        config = transformers.Qwen2MoeConfig(
            num_experts=E, moe_intermediate_size=24, shared_expert_intermediate_size=36, mlp_only_layers=[0],
            norm_topk_prob=False, **common,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3 if "gate" in name else 0.1)
    model.eval()
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # Mixtral is saved in shards, so that the index path is exercised too.
    hf = tiny_hf(request.param, folder, "40KB" if request.param == "mixtral" else None)
    return request.param, hf, moe.Model.from_pretrained(folder).eval(), folder


def test_logits_and_aux_loss_match_transformers(pair):
    kind, hf, ours, folder = pair
    if kind == "mixtral":
        assert (folder / "model.safetensors.index.json").exists()
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        ref = hf(idx, labels=idx, output_router_logits=True)
        logits, _ = ours(idx)
        assert (logits - ref.logits).abs().max().item() < 1e-4
        # Per MoE layer: the same router logits, and Hugging Face's balancing loss is k times ours.
        layers = ours.moe_layers()
        assert len(layers) == len(ref.router_logits) == (2 if kind == "mixtral" else 1)
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        for layer, router_logits in zip(layers, ref.router_logits):
            hf_aux = load_balancing_loss_func((router_logits,), E, K)
            assert abs(K * layer.aux_loss.item() - hf_aux.item()) < 1e-5
        if kind == "qwen2_moe":  # one MoE layer: the whole training loss must agree as well
            targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)  # HF shifts labels inside
            assert abs(ours(idx, targets)[1].item() - ref.loss.item()) < 1e-5


def test_loads_transformers_in_memory_fused_layout(pair, tmp_path):
    """transformers 5 keeps experts as fused (E, 2I, C) / (E, C, I) tensors; a file in that layout loads too."""
    from safetensors.torch import save_file

    kind, hf, ours, folder = pair
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.allclose(moe.Model.from_pretrained(tmp_path)(idx)[0], hf(idx).logits, atol=1e-4)


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        moe.Model.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="MixtralForCausalLM"):
        moe.Model.from_pretrained(tmp_path)


def naive_dispatch(x, indices, weights, gate_up, down, capacity=None):
    """One token and one choice at a time, in token order; an expert serves only its first `capacity`."""
    y, used, dropped = torch.zeros_like(x), [0] * gate_up.size(0), 0
    for t in range(x.size(0)):
        for j in range(indices.size(1)):
            e = indices[t, j].item()
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            y[t] += weights[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return y, dropped


@pytest.mark.parametrize("capacity", [None, 3])
def test_sorted_dispatch_equals_per_token_loop(capacity):
    torch.manual_seed(0)
    N, C, I, n_experts = 12, 8, 6, 5
    x = torch.randn(N, C)
    gate_up, down = torch.randn(n_experts, 2 * I, C), torch.randn(n_experts, C, I)
    # Ties everywhere: most tokens pick expert 2, several pick the same pair, some weights are equal,
    # and expert 4 is never chosen.
    indices = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3], [1, 2], [2, 0], [3, 1], [2, 0], [0, 1], [2, 3], [1, 0],
                            [3, 2]])
    weights = torch.rand(N, 2)
    weights[::3] = 0.5
    y, load, dropped = moe.moe_dispatch(x, indices, weights, gate_up, down, capacity)
    assert load.tolist() == torch.bincount(indices.flatten(), minlength=gate_up.size(0)).tolist()
    y_ref, dropped_ref = naive_dispatch(x, indices, weights, gate_up, down, capacity)
    assert dropped == dropped_ref and (dropped > 0) == (capacity is not None)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_balancing_loss_hand_values():
    n_tokens, n_experts = 8, 4
    # Uniform: every expert gets the same share of assignments and the same mean probability -> 1.
    uniform = torch.full((n_tokens, n_experts), 1 / n_experts)
    counts = torch.bincount(torch.arange(n_tokens * 2) % n_experts, minlength=n_experts)
    assert moe.load_balancing_loss(uniform, counts).item() == pytest.approx(1.0)
    # Collapsed onto expert 0 with k = 1: f = P = (1, 0, 0, 0) -> E * 1 * 1.
    collapsed = torch.zeros(n_tokens, n_experts)
    collapsed[:, 0] = 1
    counts = torch.tensor([n_tokens, 0, 0, 0])
    assert moe.load_balancing_loss(collapsed, counts).item() == pytest.approx(n_experts)
    # Collapsed with k = 2 onto experts 0 and 1: f = (1/2, 1/2, 0, 0), P = (1, 0, 0, 0) -> E / 2.
    counts = torch.tensor([n_tokens, n_tokens, 0, 0])
    assert moe.load_balancing_loss(collapsed, counts).item() == pytest.approx(n_experts / 2)


def cv_after(layer, skew, steps):
    """Coefficient of variation of the expert counts, summed over the last 5 of `steps` fresh batches."""
    torch.manual_seed(1)
    loads = []
    for _ in range(steps):
        with torch.no_grad():
            layer(torch.randn(1, 256, 16) + skew)
        loads.append(layer.load.float())
    load = sum(loads[-5:])
    return (load.std(unbiased=False) / load.mean()).item()


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_bias_balancing_evens_out_a_skewed_router(score_func):
    torch.manual_seed(0)
    config = moe.Config(dim=16, n_experts=8, top_k=2, expert_dim=8, score_func=score_func, bias_update_rate=0.01)
    layer = moe.MoE(config).train()
    with torch.no_grad():
        torch.nn.init.normal_(layer.gate_up, std=0.1)
        torch.nn.init.normal_(layer.down, std=0.1)
        torch.nn.init.normal_(layer.router.weight, std=0.3)
        layer.router.weight[0] += 0.5
    skew = 0.5 * layer.router.weight[0]  # tokens lean towards expert 0
    weight_before = layer.router.weight.clone()
    balanced = cv_after(layer, skew, 100)
    assert torch.equal(layer.router.weight, weight_before)  # only the selection bias moved
    assert layer.router.bias[0] < 0
    # The same router without bias updates stays skewed.
    layer.router.bias.zero_()
    layer.config.bias_update_rate = 0.0
    skewed = cv_after(layer, skew, 5)
    assert skewed > 0.5 and balanced < skewed / 3, (skewed, balanced)


def test_kv_cache_decoding_equals_recomputation():
    torch.manual_seed(0)
    config = moe.Config(n_layers=3, first_dense_layers=1, n_shared_experts=1, shared_expert_gate=True, qkv_bias=True)
    model = moe.Model(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        for layer in model.layers:
            layer.attention.cache = moe.KVCache(
                2, config.n_kv_heads, config.max_seq_len, config.head_dim, torch.float32, "cpu")
        steps = [model(idx[:, :12])[0]]
        steps += [model(idx[:, t : t + 1], pos=t)[0] for t in range(12, 16)]
        steps.append(model(idx[:, 16:], pos=16)[0])  # a chunk after a cached prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_uncached_argmax():
    torch.manual_seed(0)
    model = moe.Model(moe.Config(n_shared_experts=2, score_func="sigmoid", bias_update_rate=0.01)).train()
    prompt = torch.randint(0, 512, (2, 5))
    cached = model.generate(prompt, 10, temperature=0)
    assert model.training and all(layer.attention.cache is None for layer in model.layers)
    model.eval()
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_metrics_of_a_collapsed_router_with_capacity():
    """Every token picks experts 0 and 1 (the selection bias decides between equal scores)."""
    config = moe.Config(n_layers=2, first_dense_layers=1, n_experts=8, top_k=2, capacity_factor=1.0)
    model = moe.Model(config).train()
    layer = model.moe_layers()[0]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0]))
    n = 64
    model(torch.randint(0, config.vocab_size, (2, n // 2)))
    m = model.metrics()
    assert [m[f"load_l1_e{j}"] for j in range(8)] == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert "load_l0_e0" not in m  # layer 0 is dense
    # Capacity: 1.0 * 2n / 8 assignments per expert, so experts 0 and 1 keep n/4 of their n each.
    assert m["dropped"] == pytest.approx(1 - 2 * (n / 4) / (2 * n))
    assert m["dead"] == 6 and m["maxvio"] == pytest.approx(3.0) and m["cv"] == pytest.approx(3**0.5)
    assert m["aux_loss"] == pytest.approx(1.0)  # uniform probabilities: P_i = 1/E whatever f is


# Each a single bad value; the first key is the field the message must name. dim and n_heads show that
# the checks shared with gpt_llama.py run here too.
BAD_CONFIGS = [
    dict(dim=-5), dict(n_heads=0), dict(qkv_bias=1), dict(n_experts=0), dict(n_experts=8.0), dict(top_k=0),
    dict(top_k=9), dict(top_k=True), dict(expert_dim=0), dict(n_shared_experts=-1), dict(shared_expert_dim=0),
    dict(shared_expert_gate="yes"), dict(shared_expert_gate=True), dict(score_func="relu"), dict(score_func=None),
    dict(norm_topk=None), dict(first_dense_layers=-1), dict(first_dense_layers=1.5), dict(moe_every=0),
    dict(aux_loss_coef=-0.01), dict(aux_loss_coef=math.inf), dict(z_loss_coef=math.nan), dict(z_loss_coef="1e-3"),
    dict(bias_update_rate=-1e-3), dict(bias_update_rate=False), dict(capacity_factor=0), dict(capacity_factor=-1.0),
    dict(capacity_factor=math.inf), dict(capacity_factor="1.25"),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=repr)
def test_bad_config_values_get_one_sentence_naming_the_field(bad):
    """train.py turns a ValueError from Config into one line for the user; Model is never reached."""
    with pytest.raises(ValueError) as error:
        moe.Config(**bad)
    message = str(error.value)
    assert next(iter(bad)) in message and "\n" not in message


@pytest.mark.parametrize("good", [
    dict(), moe.TRAIN_RECIPE["config"], dict(top_k=8), dict(n_experts=1, top_k=1), dict(score_func="sigmoid"),
    dict(n_shared_experts=2, shared_expert_gate=True), dict(capacity_factor=1, aux_loss_coef=0, z_loss_coef=0),
    dict(first_dense_layers=2, moe_every=3),  # no MoE layer at all: a dense model
], ids=repr)
def test_good_configs_still_build_and_run(good):
    model = moe.Model(moe.Config(**good)).train()
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert model(idx, idx)[1].isfinite()


@pytest.mark.parametrize("n_layers, first_dense_layers, moe_every, expected", [
    (4, 0, 1, [0, 1, 2, 3]),
    (4, 1, 1, [1, 2, 3]),
    (6, 0, 2, [1, 3, 5]),  # Hugging Face's decoder_sparse_step: layer i is sparse when (i + 1) % step == 0
    (5, 1, 2, [1, 3]),
    (6, 2, 2, [3, 5]),
    (7, 1, 3, [2, 5]),
    (3, 3, 1, []),
])
def test_moe_layer_placement(n_layers, first_dense_layers, moe_every, expected):
    config = moe.Config(vocab_size=16, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=8, expert_dim=8, n_experts=2, top_k=1,
                        n_layers=n_layers, first_dense_layers=first_dense_layers, moe_every=moe_every)
    layers = moe.Model(config).layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer.feed_forward, moe.MoE)] == expected
    assert all(isinstance(layer.feed_forward, moe.FeedForward) for i, layer in enumerate(layers) if i not in expected)


@pytest.mark.parametrize("n_layers", [1, 8])
def test_initial_weights_follow_gpt2_residual_scaling(n_layers):
    """As in gpt_llama.py: every matrix starts as N(0, 0.02), except those that write into the residual stream
    (attention's wo, the experts' down, a dense or shared SwiGLU's w2): N(0, 0.02 / sqrt(2 * n_layers))."""
    torch.manual_seed(0)
    config = moe.Config(vocab_size=1000, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, n_layers=n_layers,
                        first_dense_layers=n_layers // 2, n_experts=4, expert_dim=64, n_shared_experts=1,
                        shared_expert_dim=64, qkv_bias=True, tie_embeddings=False)
    residual = []
    for name, p in moe.Model(config).named_parameters():
        if p.dim() == 1:  # norms start at one, the query, key and value biases at zero
            assert torch.equal(p, torch.ones_like(p) if name.endswith("norm.weight") else torch.zeros_like(p)), name
            continue
        if name.endswith(("attention.wo.weight", "feed_forward.down", "w2.weight")):
            residual.append(name)
            std = 0.02 / math.sqrt(2 * n_layers)
        else:
            std = 0.02
        # within five standard errors: of the sample std about std / sqrt(2 n), of the mean std / sqrt(n)
        assert p.std().item() == pytest.approx(std, rel=5 / math.sqrt(2 * p.numel())), name
        assert abs(p.mean().item()) < 5 * std / math.sqrt(p.numel()), name
    # per layer: wo, and w2 of the dense layer, or down and the shared expert's w2 of an MoE layer
    assert len(residual) == 2 * n_layers + (n_layers - n_layers // 2)


def expert_by_hand(layer, e, x):
    """Expert e of an MoE layer on one token x (C,): down (silu(gate x) * up x)."""
    gate, up = (layer.gate_up[e] @ x).chunk(2)
    return layer.down[e] @ (torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("n_tokens, capacity_factor, capacity", [
    (10, 1.0, 3),  # 1.0 * 10 * 2 / 8 = 2.5 assignments per expert: rounded up to 3 (round() would give 2)
    (8, 1.0, 2),  # exactly 2: no rounding
    (12, 1.25, 4),  # 3.75 -> 4
    (10, 0.5, 2),  # 1.25 -> 2
])
def test_capacity_rounds_up_and_drops_the_later_tokens(n_tokens, capacity_factor, capacity):
    """Capacity = ceil(capacity_factor * N * k / E). Every token picks experts 0 and 1 (zero router weights, so
    equal scores, and the selection bias decides), so each of the two serves the first `capacity` tokens and
    drops the rest, whose MoE output is zero: a dropped token keeps only its residual. At inference, none drop."""
    torch.manual_seed(0)
    config = moe.Config(dim=8, n_experts=8, top_k=2, expert_dim=4, capacity_factor=capacity_factor)
    layer = moe.MoE(config).train()
    with torch.no_grad():
        torch.nn.init.normal_(layer.gate_up)
        torch.nn.init.normal_(layer.down)
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0]))
        x = torch.randn(1, n_tokens, 8)
        # equal scores, renormalised over the two chosen experts: weights 1/2 and 1/2
        served = torch.stack([0.5 * expert_by_hand(layer, 0, t) + 0.5 * expert_by_hand(layer, 1, t) for t in x[0]])
        y = layer(x)[0]
        assert layer.dropped == pytest.approx((n_tokens - capacity) / n_tokens)
        torch.testing.assert_close(y[:capacity], served[:capacity])
        assert torch.equal(y[capacity:], torch.zeros_like(y[capacity:]))
        layer.eval()
        torch.testing.assert_close(layer(x)[0], served)
        assert layer.dropped == 0


@pytest.mark.parametrize("norm_topk", [False, True])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_selection_bias_never_enters_the_mixing_weights(score_func, norm_topk):
    """DeepSeek-V3's bias picks the experts; their weights are the unbiased scores of the picked experts."""
    torch.manual_seed(0)
    router = moe.Router(moe.Config(dim=8, n_experts=6, top_k=2, score_func=score_func, norm_topk=norm_topk))
    with torch.no_grad():
        torch.nn.init.normal_(router.weight)
        router.bias.copy_(torch.tensor([0, 0, 0, 0, 50.0, 30.0]))  # experts 4 and 5 win whatever the scores
    x = torch.randn(16, 8)
    _, _, indices, weights = router(x)
    assert indices.tolist() == [[4, 5]] * 16
    logits = x @ router.weight.detach().T
    if score_func == "softmax":
        scores = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    else:
        scores = 1 / (1 + (-logits).exp())
    expected = scores[:, 4:6]
    if norm_topk:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, expected)


def test_router_z_loss_hand_values():
    """ST-MoE's z-loss: the mean over tokens of logsumexp(router logits) squared."""
    # (0, 0): logsumexp ln 2; (ln 3, 0): ln 4 = 2 ln 2. Mean of the squares: (1 + 4) / 2 * (ln 2)^2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert moe.router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)
    # An MoE layer takes it of its router's logits, and the model adds z_loss_coef times the mean over layers.
    torch.manual_seed(0)
    config = moe.Config(vocab_size=16, dim=8, n_heads=2, n_kv_heads=1, n_layers=3, first_dense_layers=1, n_experts=3,
                        top_k=1, aux_loss_coef=0.0, z_loss_coef=0.5)
    model = moe.Model(config)
    inputs = {}  # each MoE layer's input tokens (N, C)
    for layer in model.moe_layers():
        layer.register_forward_hook(lambda module, args, output: inputs.update({module: args[0].reshape(-1, 8)}))
    idx = torch.randint(0, 16, (1, 5))
    logits, loss = model(idx, idx)
    z_losses = []
    for layer in model.moe_layers():
        W = layer.router.weight.tolist()
        by_hand = [math.log(sum(math.exp(sum(w * v for w, v in zip(row, token))) for row in W)) ** 2
                   for token in inputs[layer].tolist()]
        z_losses.append(sum(by_hand) / len(by_hand))
        assert layer.z_loss.item() == pytest.approx(z_losses[-1], rel=1e-5)
    assert len(z_losses) == 2 and z_losses[0] != pytest.approx(z_losses[1])
    assert (loss - moe.lm_loss(logits, idx)).item() == pytest.approx(0.5 * sum(z_losses) / 2, rel=1e-4)


def test_decoding_in_train_mode_equals_decoding_in_eval_mode():
    """Decoding runs in eval mode whatever mode the model is in: no dropout, no token dropped over capacity,
    no update of the balancing bias; and every module gets its own mode back."""
    torch.manual_seed(0)
    config = moe.Config(n_layers=3, first_dense_layers=1, dropout=0.5, capacity_factor=0.5, bias_update_rate=0.1)
    model = moe.Model(config).eval()
    idx = torch.randint(0, 512, (2, 6))
    greedy = model.generate(idx, 20, temperature=0)
    sampled = model.generate(idx, 20, temperature=1.0, top_k=50, seed=0)
    model.train()
    model.layers[2].eval()  # a mix of modes that the caller chose, to be kept
    modes = [m.training for m in model.modules()]
    biases = [m.router.bias.clone() for m in model.moe_layers()]
    assert torch.equal(model.generate(idx, 20, temperature=0), greedy)
    assert torch.equal(model.generate(idx, 20, temperature=1.0, top_k=50, seed=0), sampled)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(m.router.bias, b) for m, b in zip(model.moe_layers(), biases))
    model(idx)  # while a training forward pass drops tokens and moves the bias
    assert model.metrics()["dropped"] > 0 and not torch.equal(model.moe_layers()[0].router.bias, biases[0])
