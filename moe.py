"""
A mixture-of-experts (MoE) decoder-only language model in one file.

The attention half of every block is gpt_llama.py's LLaMA block (RMSNorm, RoPE, grouped-query
attention). In the feed-forward half, a router sends each token to k of E small SwiGLU experts, so the
model holds E experts' parameters but spends only k experts' compute per token:
- sparsely gated experts with a learned top-k router (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538);
- capacity limits and dispatch across many experts, GShard (Lepikhin et al. 2020, https://arxiv.org/abs/2006.16668);
- the load-balancing auxiliary loss of the Switch Transformer (Fedus et al. 2021, https://arxiv.org/abs/2101.03961);
- the router z-loss of ST-MoE (Zoph et al. 2022, https://arxiv.org/abs/2202.08906);
- top-2 of 8 experts with renormalised weights, Mixtral (Jiang et al. 2024, https://arxiv.org/abs/2401.04088);
- always-on shared experts and fine-grained experts, DeepSeekMoE (Dai et al. 2024, https://arxiv.org/abs/2401.06066),
  with a sigmoid gate on the shared expert as in Qwen2-MoE (Qwen team 2024, https://arxiv.org/abs/2407.10671);
- auxiliary-loss-free balancing with a per-expert bias that only steers selection, DeepSeek-V3
  (DeepSeek-AI 2024, https://arxiv.org/abs/2412.19437), and its sigmoid router scores.

Dispatch is dropless by default: the N*k token-expert assignments are sorted by expert, so each expert
runs one matmul over a contiguous slice of tokens. With a capacity factor, assignments past an expert's
capacity are dropped during training (the token keeps its residual), as in GShard and Switch.

Shapes, with B = batch, T = sequence length, C = dim, N = B * T tokens, E = n_experts, k = top_k,
I = expert_dim, H = n_heads, K = n_kv_heads, D = head_dim:
    idx                     (B, T)          token ids
    x                       (B, T, C)       residual stream; flattened to (N, C) inside the MoE layer
    q / k, v                (B, H / K, T, D)
    router logits, scores   (N, E)          float32
    indices, weights        (N, k)          chosen experts and their mixing weights
    gate_up                 (E, 2 * I, C)   each expert's SwiGLU gate and up projections, stacked
    down                    (E, C, I)       each expert's down projection
    logits                  (B, T, vocab_size)
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 172  # SwiGLU width of the layers that stay dense (see placement below)
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3 RoPE scaling, as in gpt_llama.py
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    qkv_bias: bool = False  # Qwen2-MoE has biases on the query, key and value projections
    qk_norm: bool = False  # gpt_llama.py's Qwen3 query and key norms; no checkpoint loaded here has them
    sliding_window: int | None = None  # as in gpt_llama.py; None: every position sees all before it
    # The experts.
    n_experts: int = 8
    top_k: int = 2
    expert_dim: int = 64
    n_shared_experts: int = 0  # always-on experts every token goes through
    shared_expert_dim: int = 64
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(w . x)
    score_func: str = "softmax"  # "softmax" (Mixtral, Qwen2-MoE) or "sigmoid" (DeepSeek-V3)
    norm_topk: bool = True  # rescale the k chosen weights to sum to 1
    # Placement: layer i is an MoE layer when i >= first_dense_layers and (i + 1) % moe_every == 0
    # (Hugging Face's decoder_sparse_step convention).
    first_dense_layers: int = 0
    moe_every: int = 1
    # Balancing. aux_loss_coef uses the Switch Transformer's scale, where the loss is 1 at uniform
    # routing; Hugging Face's load_balancing_loss_func is k times larger, so its router_aux_loss_coef
    # is ours divided by k.
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 balancing, a step per training forward pass
    capacity_factor: float | None = None  # None: dropless

    def __post_init__(self):
        check_decoder_fields(self)  # the fields that gpt_llama.py's Config has too
        require(self, "shared_expert_gate norm_topk", bool, "True or False")
        require(self, "n_experts expert_dim shared_expert_dim moe_every", int, "a positive integer", lambda v: v > 0)
        require(self, "n_shared_experts first_dense_layers", int, "an integer >= 0", lambda v: v >= 0)
        require(self, "top_k", int, f"an integer from 1 to n_experts ({self.n_experts})",
                lambda v: 1 <= v <= self.n_experts)
        require(self, "score_func", str, "'softmax' or 'sigmoid'", lambda v: v in ("softmax", "sigmoid"))
        require(self, "aux_loss_coef z_loss_coef bias_update_rate", (int, float), "a finite number >= 0",
                lambda v: 0 <= v < math.inf)
        require(self, "capacity_factor", (int, float), "None or a positive finite number", lambda v: 0 < v < math.inf,
                or_none=True)
        if self.shared_expert_gate and not self.n_shared_experts:
            raise ValueError("shared_expert_gate needs n_shared_experts >= 1, the experts it gates")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    def is_moe_layer(self, i):
        return i >= self.first_dense_layers and (i + 1) % self.moe_every == 0


TASK = "causal_lm"
HF_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
# What Model.metrics() returns, in words and units, for the training log's plot (plot.py).
METRICS = {
    "cv": ("coefficient of variation of expert load", "std / mean (0: even)"),
    "maxvio": ("busiest expert's load over the mean, minus 1", "worst layer (0: even)"),
    "dead": ("experts that got no token", "experts, all layers"),
    "dropped": ("share of assignments over capacity, dropped", "share"),
    "aux_loss": ("load-balancing loss (Switch)", "1: even load"),
    "z_loss": ("router z-loss", "mean squared log-sum-exp"),
}
# Defaults of `python train.py --model moe`: about five minutes on two CPU cores.
TRAIN_RECIPE = dict(
    # gpt_llama.py's shape with 8 experts, 2 active, each half as wide as its dense SwiGLU, so that a
    # token costs about what it costs there. The corpus is small (115k tokens, about 17 epochs in five
    # minutes) and 2.6M parameters overfit it: with dropout 0.1 the validation loss turned up after
    # step 1200 and ended at 1.79 bits per byte, with 0.2 at 1.73. bench/moe.py compares with dense.
    config=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, dropout=0.2,
                n_experts=8, top_k=2, expert_dim=172, aux_loss_coef=0.01, bias_update_rate=1e-3),
    vocab_size=2048,
    batch_size=8,
    lr=3e-3,
    warmup_steps=20,
    time_budget=300,
)

# copied from gpt_llama.py: LLAMA3_SCALING_KEYS
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# copied from gpt_llama.py: check_decoder_fields
def check_decoder_fields(c):
    """Raise a ValueError that names the field, for a value of Config c that no model can be built with.

    train.py fills a Config from the command line (`--set dim=-5`, read with ast.literal_eval), so a
    field may hold any number, string, list or None: the user must get one sentence, not a traceback
    from deep inside torch.
    """
    require(c, "vocab_size dim n_layers n_heads n_kv_heads ffn_dim max_seq_len", int, "a positive integer",
            lambda v: v > 0)
    require(c, "head_dim", int, "None or a positive even integer (RoPE rotates pairs of coordinates)",
            lambda v: v > 0 and v % 2 == 0, or_none=True)
    require(c, "rope_theta norm_eps", (int, float), "a positive finite number", lambda v: 0 < v < math.inf)
    require(c, "dropout", (int, float), "a number in [0, 1)", lambda v: 0 <= v < 1)
    require(c, "tie_embeddings qkv_bias qk_norm", bool, "True or False")
    require(c, "sliding_window", int, "None or a positive integer", lambda v: v > 0, or_none=True)
    require(c, "rope_scaling", dict, "None or a dict of the positive numbers factor, low_freq_factor < "
            "high_freq_factor and original_max_position_embeddings", is_llama3_scaling, or_none=True)
    if c.n_heads % c.n_kv_heads:
        raise ValueError(f"n_heads ({c.n_heads}) must be a multiple of n_kv_heads ({c.n_kv_heads})")
    if c.head_dim is None and (c.dim % c.n_heads or c.dim // c.n_heads % 2):
        raise ValueError(f"dim ({c.dim}) must be n_heads ({c.n_heads}) times an even number, or head_dim must be set")


# copied from gpt_llama.py: require
def require(config, names, kind, allowed, ok=lambda value: True, or_none=False):
    """Raise a ValueError unless each field in names (separated by spaces) is of kind and passes ok."""
    for name in names.split():
        value = getattr(config, name)
        if not (or_none and value is None or is_a(value, kind) and ok(value)):
            raise ValueError(f"{name} must be {allowed}, not {value!r}")


# copied from gpt_llama.py: is_llama3_scaling
def is_llama3_scaling(s):
    """Whether the dict s holds the keys LLAMA3_SCALING_KEYS and no other, with fitting numbers."""
    positive = all(is_a(v, (int, float)) and 0 < v < math.inf for v in s.values())
    return set(s) == set(LLAMA3_SCALING_KEYS) and positive and s["low_freq_factor"] < s["high_freq_factor"]


# copied from gpt_llama.py: is_a
def is_a(value, kind):
    """isinstance, except that a bool is no number: n_layers=True is a mistake, not one layer."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


# copied from gpt_llama.py: RMSNorm
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even under bf16 autocast: the mean of squares loses precision otherwise.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# copied from gpt_llama.py: rope_tables
def rope_tables(head_dim, max_seq_len, theta, scaling=None):
    """cos and sin of (max_seq_len, head_dim) for every position, in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is not None:
        # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between, so the
        # model sees wavelengths it was trained on when the context grows past the original length.
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low_wavelen = old_len / scaling["low_freq_factor"]
        high_wavelen = old_len / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"]
        )
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, interpolated, inv_freq)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    # Hugging Face's layout: the two halves of a head, not interleaved pairs, form the rotated planes.
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


# copied from gpt_llama.py: apply_rope
def apply_rope(x, cos, sin):
    """Rotate (x[:D/2], x[D/2:]) pairs of x (B, H, T, D) by the angles whose cos and sin are (T, D)."""
    # In x's dtype, the tables rounded to it first, as transformers does: a bf16 model then computes
    # what the Hugging Face one computes, bit for bit, and picks the same tokens.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# copied from gpt_llama.py: KVCache
class KVCache(nn.Module):
    """Keys and values of past positions, preallocated so that decoding never reallocates."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        """Store k, v (B, K, T, D) at positions pos..pos+T and return all keys and values so far."""
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# copied from gpt_llama.py: Attention
class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Qwen3 normalises each head of queries and keys, which keeps attention logits from growing
        # without bound in training (Dehghani et al. 2023, https://arxiv.org/abs/2302.05442).
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.window = config.sliding_window
        self.dropout = config.dropout
        self.cache = None  # a KVCache while generating

    def forward(self, x, cos, sin, pos=0):
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        # Query i, at position pos + i, sees the keys at positions pos + i - window < j <= pos + i (with
        # no window, all up to its own). Keys before the first query's window are dropped, so that a new
        # token attends to the window alone, as in transformers' sliding cache.
        start = max(pos - self.window + 1, 0) if self.window else 0
        k, v = k[:, :, start:], v[:, :, start:]
        past, window = pos - start, self.window or k.size(2)
        # A prompt within the window needs the plain causal mask and a new token none; a chunk after
        # cached keys, or longer than the window, needs the mask spelled out.
        mask, is_causal = None, T > 1
        if T > 1 and (past > 0 or T > window):
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(past).triu(past - window + 1)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# copied from gpt_llama.py: FeedForward
class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# copied from gpt_llama.py: Block
class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, pos=0):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, pos))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Router(nn.Module):
    """Scores the E experts for each token and picks k of them."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.score_func, self.norm_topk = config.top_k, config.score_func, config.norm_topk
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.dim))
        # DeepSeek-V3's balancing bias is added to the scores only to choose experts, never to weight
        # their outputs, so it steers the load without a gradient that fights the language-model loss.
        self.register_buffer("bias", torch.zeros(config.n_experts))

    def forward(self, x):
        """logits and scores (N, E) in float32, indices and weights (N, k) of the chosen experts."""
        # In float32 even under bf16 autocast: a rounding error in a logit flips which expert is chosen.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        indices = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, scores, indices, weights


def moe_dispatch(x, indices, weights, gate_up, down, capacity=None):
    """Send each token of x (N, C) to its experts indices (N, k) and sum their outputs by weights (N, k).

    The N * k assignments are sorted by expert (stably, so tokens keep their order within an expert):
    each expert's tokens become one contiguous slice, and each expert costs one matmul per projection,
    whatever the routing. With a capacity, an expert serves only its first `capacity` assignments.
    Returns y (N, C), the load (E,): assignments per expert before any drop, and the number dropped.
    """
    N, k = indices.shape
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    load = counts = torch.bincount(flat, minlength=gate_up.size(0))
    if capacity is not None:
        rank = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    token, sizes = order // k, counts.tolist()
    # Only the matmuls run per expert; the activation runs once over all of them. unbind, not
    # gate_up[e], which would give each expert a full-size zero gradient in backward.
    h = torch.cat([F.linear(xe, w) for xe, w in zip(x[token].split(sizes), gate_up.unbind(0))])
    gate, up = h.chunk(2, dim=-1)
    h = F.silu(gate) * up
    y = torch.cat([F.linear(he, w) for he, w in zip(h.split(sizes), down.unbind(0))])
    y = y * weights.flatten()[order, None]
    return x.new_zeros(x.shape).index_add(0, token, y.to(x.dtype)), load, N * k - order.numel()


def load_balancing_loss(scores, counts):
    """The Switch Transformer's loss E * sum_i f_i * P_i, which is 1 when the routing is uniform.

    f_i is the fraction of the token-expert assignments that went to expert i (from counts (E,)),
    P_i the mean router probability of expert i over the tokens (scores (N, E)). f carries no gradient;
    P does, and the product pushes probability away from overloaded experts.
    """
    probs = scores / scores.sum(dim=-1, keepdim=True)  # sigmoid scores do not sum to 1 by themselves
    f = counts.float() / counts.sum()
    return counts.numel() * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits):
    """ST-MoE's penalty on large router logits (N, E), which keeps the float32 softmax stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Routed SwiGLU experts, plus shared experts that every token goes through."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.router = Router(config)
        E, I, C = config.n_experts, config.expert_dim, config.dim
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, C))
        self.down = nn.Parameter(torch.empty(E, C, I))
        self.shared = nn.ModuleList(FeedForward(C, config.shared_expert_dim) for _ in range(config.n_shared_experts))
        self.shared_gate = nn.Linear(C, config.n_shared_experts, bias=False) if config.shared_expert_gate else None

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)
        logits, scores, indices, weights = self.router(x)
        # Dropping is a training-time device for bounded memory; at inference every token is served,
        # which also keeps cached decoding equal to recomputation.
        capacity = None
        if self.training and self.config.capacity_factor is not None:
            capacity = math.ceil(self.config.capacity_factor * indices.numel() / self.config.n_experts)
        y, counts, dropped = moe_dispatch(x, indices, weights, self.gate_up, self.down, capacity)
        gates = self.shared_gate(x).sigmoid() if self.shared_gate is not None else None
        for j, expert in enumerate(self.shared):
            y = y + (expert(x) if gates is None else gates[:, j : j + 1] * expert(x))
        self.aux_loss = load_balancing_loss(scores, counts)
        self.z_loss = router_z_loss(logits)
        self.load, self.dropped = counts.detach(), dropped / indices.numel()
        if self.training and self.config.bias_update_rate > 0:
            self.update_bias(counts)
        return y.view(B, T, C)

    @torch.no_grad()
    def update_bias(self, counts):
        """DeepSeek-V3: raise the bias of underloaded experts and lower that of overloaded ones."""
        counts = counts.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every rank must keep the same biases
        self.router.bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        for i, layer in enumerate(self.layers):
            # gpt_llama's block, with a mixture of experts in place of its feed-forward layer.
            if config.is_moe_layer(i):
                layer.feed_forward = MoE(config)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                # GPT-2's residual scaling: shrink the projections that write into the residual stream
                # by sqrt(2 * n_layers), so the stream's variance does not grow with depth.
                residual = name.endswith(("wo.weight", "w2.weight", "down"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers) if residual else 0.02)
            elif name.endswith("bias"):  # Qwen2-MoE's query, key and value biases start at zero
                nn.init.zeros_(p)

    def moe_layers(self):
        return [layer.feed_forward for layer in self.layers if isinstance(layer.feed_forward, MoE)]

    def forward(self, idx, targets=None, pos=0):
        """Logits (B, T, vocab_size) for idx (B, T) at positions pos..pos+T, and the loss if targets.

        The loss adds the balancing and z losses, averaged over the MoE layers, to the cross-entropy.
        """
        B, T = idx.shape
        if pos + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {pos + T} tokens is longer than the context of {self.config.max_seq_len}; "
                "shorten the input or use a model with a larger max_seq_len"
            )
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.dropout(self.tok_embeddings(idx))
        for layer in self.layers:
            x = layer(x, cos, sin, pos)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits, None
        loss = lm_loss(logits, targets)
        moes = self.moe_layers()
        if moes:
            loss = loss + self.config.aux_loss_coef * sum(m.aux_loss for m in moes) / len(moes)
            loss = loss + self.config.z_loss_coef * sum(m.z_loss for m in moes) / len(moes)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, seed=None):
        """Yield max_new_tokens (B,) tensors of new tokens after the equal-length prompts idx (B, T).

        As gpt_llama.py's: temperature 0 is greedy; a row that has produced eos_id keeps yielding it and
        the stream ends once every row has; seed leaves torch's global random state alone.
        """
        c = self.config
        if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.numel() > 0 and not idx.is_floating_point()):
            got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (batch, time) tensor of integer token ids, got {got}")
        B, T = idx.shape
        if T + max_new_tokens > c.max_seq_len:
            raise ValueError(f"a prompt of {T} tokens plus {max_new_tokens} new ones exceeds the context of "
                             f"{c.max_seq_len}; shorten the prompt or ask for fewer tokens")
        if idx.min() < 0 or idx.max() >= c.vocab_size:
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got {idx.min()}..{idx.max()}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(
                f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        generator = None if seed is None else torch.Generator(idx.device).manual_seed(seed)
        w = self.tok_embeddings.weight
        caches = [KVCache(B, c.n_kv_heads, T + max_new_tokens, c.head_dim, w.dtype, w.device) for _ in self.layers]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, pos = idx.long(), 0
        for _ in range(max_new_tokens):
            logits = self.decode(tokens, pos, caches)
            pos += tokens.size(1)
            tokens = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                tokens = tokens.masked_fill(done, eos_id)
                done |= tokens == eos_id
            yield tokens
            if eos_id is not None and done.all():
                return
            tokens = tokens[:, None]

    def decode(self, tokens, pos, caches):
        """Logits (B, vocab_size) of the token after tokens (B, T) at positions pos..pos+T.

        The caches are attached only for this call, and the model runs in eval mode (no dropout, no token
        dropping, no bias updates), so that a half-read stream leaves no state behind.
        """
        # Each module's own mode, which a caller may have set apart from the model's, comes back after.
        modes = [(module, module.training) for module in self.modules()] if self.training else []
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache
        try:
            if modes:
                self.eval()
            return self(tokens, pos=pos)[0][:, -1]
        finally:
            for layer in self.layers:
                layer.attention.cache = None
            for module, training in modes:
                module.training = training

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) followed by up to max_new_tokens new tokens: (B, T + n). Takes generate_stream's options."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx.long()] + [t[:, None] for t in new], dim=1)

    @classmethod
    def from_pretrained(cls, folder):
        """A Hugging Face MixtralForCausalLM or Qwen2MoeForCausalLM checkpoint folder, in float32."""
        config = config_from_hf(read_hf_config(folder))
        model = cls(config)
        state = hf_to_state_dict(read_safetensors(Path(folder)), config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # The checkpoints carry no balancing bias: it stays zero, which is what they were trained with.
        missing = [k for k in missing if not k.endswith("router.bias")]
        if missing or unexpected:
            raise ValueError(
                f"{folder}: the weights do not fit config.json; missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def metrics(self):
        """Expert utilisation in the last forward pass, as floats for the training log.

        load_l{i}_e{j}: fraction of layer i's assignments that went to expert j. cv: coefficient of
        variation of the per-expert counts, mean over layers; maxvio: max load / mean load - 1, worst
        layer; dead: experts that got no token, all layers; dropped: fraction of assignments over
        capacity; aux_loss and z_loss: mean over layers.
        """
        moes = [(i, layer.feed_forward) for i, layer in enumerate(self.layers) if hasattr(layer.feed_forward, "load")]
        if not moes:
            return {}
        out, cvs, maxvios = {}, [], []
        for i, m in moes:
            load = m.load.float()
            out.update({f"load_l{i}_e{j}": share for j, share in enumerate((load / load.sum()).tolist())})
            cvs.append((load.std(unbiased=False) / load.mean()).item())
            maxvios.append((load.max() / load.mean() - 1).item())
        n = len(moes)
        out.update(
            cv=sum(cvs) / n, maxvio=max(maxvios), dead=float(sum((m.load == 0).sum().item() for _, m in moes)),
            dropped=sum(m.dropped for _, m in moes) / n, aux_loss=sum(m.aux_loss.item() for _, m in moes) / n,
            z_loss=sum(m.z_loss.item() for _, m in moes) / n,
        )
        return out

    def num_params(self, active=False):
        """Parameters, counting the tied embedding once; active=True: only those one token uses."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            c = self.config
            n -= len(self.moe_layers()) * (c.n_experts - c.top_k) * 3 * c.expert_dim * c.dim
        return n

    def flops_per_token(self):
        """Training FLOPs per token at full context, counted as gpt_llama.py does (PaLM, appendix B) but
        with only the weights a token uses: 6 per matmul weight, plus 12 * T * D per head and layer."""
        c = self.config
        # The embedding lookup costs nothing; tied, its matrix is the output head, which does.
        matmul_weights = self.num_params(active=True) - (0 if c.tie_embeddings else c.vocab_size * c.dim)
        return 6 * matmul_weights + 12 * c.n_layers * c.n_heads * c.head_dim * c.max_seq_len


# copied from gpt_llama.py: lm_loss
def lm_loss(logits, targets, ignore_index=-100):
    """Mean next-token cross-entropy; targets equal to ignore_index (padding) count for nothing."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


# copied from gpt_llama.py: sample_next
def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab_size): the argmax at temperature 0, else a sample from
    the softmax of logits / temperature, restricted to the top_k most likely tokens and to the
    nucleus (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751): the fewest most likely tokens
    whose probabilities add up to at least top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones before it already reach top_p; the best always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def read_hf_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass a Hugging Face checkpoint folder (config.json and *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def config_from_hf(hf):
    """Our Config for a Hugging Face config.json dict of a Mixtral or Qwen2-MoE model."""
    arch = (hf.get("architectures") or ["(none)"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"config.json names architecture {arch}; this file loads only {', '.join(HF_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; the experts here are SwiGLU (silu)")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported; only 'default' and 'llama3' are")
    qwen = arch == "Qwen2MoeForCausalLM"
    top_k = hf["num_experts_per_tok"]
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ValueError(f"mlp_only_layers {dense} is not supported; only the first layers may be dense")
    # Sliding-window attention sees the whole sequence when it is no longer than the window.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", not qwen) else None
    shared_dim = hf.get("shared_expert_intermediate_size", 0) if qwen else 0
    return Config(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        ffn_dim=hf["intermediate_size"],
        max_seq_len=min(hf["max_position_embeddings"], window or hf["max_position_embeddings"]),
        rope_theta=rope["rope_theta"],
        rope_scaling={k: rope[k] for k in LLAMA3_SCALING_KEYS} if rope.get("rope_type") == "llama3" else None,
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=qwen and hf.get("qkv_bias", True),
        n_experts=hf["num_experts"] if qwen else hf["num_local_experts"],
        top_k=top_k,
        expert_dim=hf["moe_intermediate_size"] if qwen else hf["intermediate_size"],
        n_shared_experts=1 if shared_dim else 0,
        shared_expert_dim=shared_dim or 64,
        shared_expert_gate=bool(shared_dim),
        norm_topk=hf.get("norm_topk_prob", False) if qwen else True,
        first_dense_layers=len(dense),
        moe_every=hf.get("decoder_sparse_step", 1) if qwen else 1,
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001) * top_k,  # Hugging Face's scale is k times ours
        z_loss_coef=0.0,
    )


# copied from gpt_llama.py: read_safetensors
def read_safetensors(folder):
    """All tensors of model.safetensors, or of the shards that model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} lacks {name}, a shard its model.safetensors.index.json lists")
        tensors.update(load_file(folder / name))
    return tensors


# Hugging Face names to ours, applied in order, after "model." and the "block_sparse_moe." of Mixtral
# checkpoints (which transformers 5 calls "mlp.") are normalised.
HF_RENAMES = [
    ("embed_tokens.", "tok_embeddings."),
    ("lm_head.", "output."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".self_attn.q_proj.", ".attention.wq."),
    (".self_attn.k_proj.", ".attention.wk."),
    (".self_attn.v_proj.", ".attention.wv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.experts.gate_up_proj", ".feed_forward.gate_up"),  # transformers 5's fused (E, 2I, C) layout
    (".mlp.experts.down_proj", ".feed_forward.down"),
    (".mlp.gate.", ".feed_forward.router."),
    (".mlp.shared_expert_gate.", ".feed_forward.shared_gate."),
    (".mlp.shared_expert.", ".feed_forward.shared.0."),
    (".mlp.", ".feed_forward."),
    ("gate_proj.", "w1."),
    ("up_proj.", "w3."),
    ("down_proj.", "w2."),
]
# The per-expert layout that save_pretrained writes: experts.{e}.w1 / w3 / w2 (Mixtral) or
# experts.{e}.gate_proj / up_proj / down_proj (Qwen2-MoE).
HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
HF_EXPERT_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def hf_to_state_dict(hf_state, config):
    """Our state dict from a Hugging Face one: renamed, and per-expert matrices stacked into 3-D tensors."""
    state, experts = {}, {}
    for name, tensor in hf_state.items():
        m = HF_EXPERT.fullmatch(name)
        if m and m[3] in HF_EXPERT_PART:
            experts.setdefault((int(m[1]), HF_EXPERT_PART[m[3]]), {})[int(m[2])] = tensor.float()
            continue
        name = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
        for old, new in HF_RENAMES:
            name = name.replace(old, new)
        state[name] = tensor.float()
    for (layer, part), per_expert in experts.items():
        if sorted(per_expert) != list(range(config.n_experts)):
            raise ValueError(
                f"layer {layer} has {part} matrices for experts {sorted(per_expert)}, not 0..{config.n_experts - 1}")
        experts[layer, part] = torch.stack([per_expert[e] for e in range(config.n_experts)])
    for layer in sorted({layer for layer, _ in experts}):
        missing = [part for part in ("gate", "up", "down") if (layer, part) not in experts]
        if missing:
            raise ValueError(f"layer {layer} lacks the experts' {' and '.join(missing)} projections")
        state[f"layers.{layer}.feed_forward.gate_up"] = torch.cat([experts[layer, "gate"], experts[layer, "up"]], dim=1)
        state[f"layers.{layer}.feed_forward.down"] = experts[layer, "down"]
    if config.tie_embeddings:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    return state

if __name__ == "__main__":
    # A toy language: arithmetic progressions mod 64 with four strides. The same tiny MoE learns it
    # twice, without any balancing and with the balancing loss plus DeepSeek-V3's bias updates, and
    # shows how the second MoE layer spread its tokens over the 8 experts in the last 20 steps.
    import time

    def batch(n=16, length=25, vocab=64):
        start, stride = torch.randint(vocab, (n, 1)), torch.tensor([1, 3, 7, 11])[torch.randint(4, (n, 1))]
        seq = (start + stride * torch.arange(length)) % vocab
        return seq[:, :-1], seq[:, 1:]

    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    for name, balancing in [("no balancing", dict(aux_loss_coef=0.0, z_loss_coef=0.0)),
                            ("aux loss + bias", dict(aux_loss_coef=0.01, bias_update_rate=0.01))]:
        torch.manual_seed(0)
        config = Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                        n_experts=8, top_k=2, expert_dim=32, **balancing)
        model = Model(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        start, load = time.perf_counter(), torch.zeros(config.n_experts)
        for step in range(150):
            x, y = batch()
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 130:
                load += model.moe_layers()[-1].load
        load /= load.sum()
        cv = (load.std(unbiased=False) / load.mean()).item()
        print(f"{name:15s} loss {loss.item():.3f} after 150 steps ({time.perf_counter() - start:.1f} s); expert load "
              f"[{' '.join(f'{v:.0%}' for v in load.tolist())}], cv {cv:.2f}")
    print(f"{model.num_params():,} parameters, {model.num_params(active=True):,} active per token")
    prompt = torch.tensor([[5, 12, 19]])  # stride 7
    print("greedy continuation of 5 12 19:", model.generate(prompt, 8, temperature=0)[0, 3:].tolist())
