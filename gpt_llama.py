"""
A LLaMA-style decoder-only language model in one file.

The architecture is the one of LLaMA (Touvron et al. 2023, https://arxiv.org/abs/2302.13971) and
Llama 3 (Grattafiori et al. 2024, https://arxiv.org/abs/2407.21783):
- pre-norm residual blocks with RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467);
- rotary position embeddings, RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864), with the
  optional Llama 3 frequency scaling for long contexts;
- grouped-query attention, GQA (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245), which covers
  multi-head (n_kv_heads == n_heads) and multi-query (n_kv_heads == 1) attention;
- a SwiGLU feed-forward layer (Shazeer 2020, https://arxiv.org/abs/2002.05202).

Three Config fields cover the models that differ from it in a line or two of the attention:
- qkv_bias: biases on the query, key and value projections, Qwen2 (Yang et al. 2024,
  https://arxiv.org/abs/2407.10671);
- qk_norm: an RMSNorm over each query and key head before RoPE, Qwen3 (Yang et al. 2025,
  https://arxiv.org/abs/2505.09388);
- sliding_window: each position attends to the last sliding_window positions only, a causal form of
  Longformer's local attention (Beltagy et al. 2020, https://arxiv.org/abs/2004.05150), Mistral 7B
  (Jiang et al. 2023, https://arxiv.org/abs/2310.06825).

Shapes, with B = batch, T = sequence length, C = dim, H = n_heads, K = n_kv_heads, D = head_dim:
    idx             (B, T)          token ids
    x               (B, T, C)       residual stream
    q               (B, H, T, D)    queries, after RoPE
    k, v            (B, K, T, D)    keys and values; each serves H // K query heads
    cos, sin        (T, D)          rotary tables for the positions in use
    logits          (B, T, vocab_size)

Around the model: the loss, decoding with a preallocated KV cache and top-k / top-p sampling, and
loading of Hugging Face Llama, Mistral, Qwen2 and Qwen3 checkpoints, in float32 or, at half the
memory, in bf16 as they are stored. `python gpt_llama.py` fits a tiny model to this text and decodes
from it.
"""

import json
import math
import time
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
    n_kv_heads: int = 2  # < n_heads: grouped-query attention; 1: multi-query attention
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 172  # about 8/3 * dim, so SwiGLU's three matrices cost what a 4 * dim MLP does
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    # Llama 3 RoPE scaling: None, or a dict with factor, low_freq_factor, high_freq_factor and
    # original_max_position_embeddings, as in a Hugging Face config's rope_scaling.
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections (not the output's)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head, before RoPE
    sliding_window: int | None = None  # Mistral: a position sees itself and window - 1 before it; None: all

    def __post_init__(self):
        check_decoder_fields(self)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads


TASK = "causal_lm"  # data.py feeds it (B, T) token ids and the same ids shifted by one as targets
# What from_pretrained accepts in a config.json. LlamaForCausalLM covers SmolLM2 and Llama 3.2.
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Defaults of `python train.py --model gpt_llama`: about five minutes on two CPU cores.
TRAIN_RECIPE = dict(
    config=dict(dim=192, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=512, max_seq_len=128, dropout=0.2),
    vocab_size=2048,
    batch_size=8,
    lr=1.5e-3,
    warmup_steps=20,
    time_budget=300,
)

# The keys of a Llama 3 rope_scaling dict; rope_tables reads each of them.
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


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


def require(config, names, kind, allowed, ok=lambda value: True, or_none=False):
    """Raise a ValueError unless each field in names (separated by spaces) is of kind and passes ok."""
    for name in names.split():
        value = getattr(config, name)
        if not (or_none and value is None or is_a(value, kind) and ok(value)):
            raise ValueError(f"{name} must be {allowed}, not {value!r}")


def is_llama3_scaling(s):
    """Whether the dict s holds the keys LLAMA3_SCALING_KEYS and no other, with fitting numbers."""
    positive = all(is_a(v, (int, float)) and 0 < v < math.inf for v in s.values())
    return set(s) == set(LLAMA3_SCALING_KEYS) and positive and s["low_freq_factor"] < s["high_freq_factor"]


def is_a(value, kind):
    """isinstance, except that a bool is no number: n_layers=True is a mistake, not one layer."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


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


def apply_rope(x, cos, sin):
    """Rotate (x[:D/2], x[D/2:]) pairs of x (B, H, T, D) by the angles whose cos and sin are (T, D)."""
    # In x's dtype, the tables rounded to it first, as transformers does: a bf16 model then computes
    # what the Hugging Face one computes, bit for bit, and picks the same tokens.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


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


def attention_reference(q, k, v, mask):
    """What F.scaled_dot_product_attention computes above, written out (it is used only by the tests).

    q (B, H, T, D), k and v (B, K, T', D), mask (T, T') True where a query may attend to a key.
    """
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # each KV head serves H // K query heads
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, T')
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's residual scaling: each block adds two projections to the residual stream, so shrink
        # them by sqrt(2 * n_layers) to keep the stream's variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, pos=0):
        """Logits (B, T, vocab_size) for idx (B, T) at positions pos..pos+T, and the loss if targets."""
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
        loss = None if targets is None else lm_loss(logits, targets)
        return logits, loss

    def num_params(self, non_embedding=False):
        """Number of parameters; non_embedding leaves out the embedding and output matrices."""
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is one parameter, counted once
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    def flops_per_token(self):
        """Training FLOPs per token at full context, as in PaLM (https://arxiv.org/abs/2204.02311),
        appendix B: every weight of a matmul costs 2 FLOPs forward and 4 backward, and attention adds
        2 * 2 * T * D per head forward (scores and weighted sum), three times that with backward."""
        c = self.config
        # The output head is a matmul; the embedding lookup costs nothing.
        matmul_weights = self.num_params(non_embedding=True) + c.vocab_size * c.dim
        return 6 * matmul_weights + 12 * c.n_layers * c.n_heads * c.head_dim * c.max_seq_len

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, seed=None):
        """Yield max_new_tokens (B,) tensors of new tokens for the equal-length prompts idx (B, T).

        temperature 0 is greedy decoding. A row that has produced eos_id keeps yielding eos_id, and
        the stream ends once every row has. seed makes the samples reproducible without touching
        torch's global random state.
        """
        is_tensor = isinstance(idx, torch.Tensor)
        is_int = is_tensor and not (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool)
        if not (is_int and idx.dim() == 2 and idx.numel() > 0):
            got = f"shape {tuple(idx.shape)} and dtype {idx.dtype}" if is_tensor else type(idx).__name__
            raise ValueError(f"idx must be a (batch, time) tensor of integer token ids, neither empty; got {got}")
        B, T = idx.shape
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"a prompt of {T} tokens plus {max_new_tokens} new tokens is longer than the context of "
                f"{self.config.max_seq_len}; shorten the prompt or ask for fewer tokens"
            )
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got {idx.min()}..{idx.max()}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1) or (
            top_p is not None and not 0 < top_p <= 1
        ):
            raise ValueError(
                "need max_new_tokens >= 0, temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got "
                f"{max_new_tokens}, {temperature}, {top_k}, {top_p}"
            )
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        p = self.tok_embeddings.weight
        caches = [KVCache(B, self.config.n_kv_heads, T + max_new_tokens, self.config.head_dim, p.dtype, p.device)
                  for _ in self.layers]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, pos = idx.long(), 0
        for _ in range(max_new_tokens):
            # Inference mode skips autograd's bookkeeping, a sizeable share of a small model's step. It
            # is entered per step, not around the yield, so that it never leaks into the caller's code.
            with torch.inference_mode():
                logits = self._decode(tokens, pos, caches)
                pos += tokens.size(1)
                tokens = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    tokens = tokens.masked_fill(done, eos_id)
                    done |= tokens == eos_id
            tokens = tokens.clone()  # an inference tensor could not enter a later training step
            yield tokens
            if eos_id is not None and done.all():
                return
            tokens = tokens[:, None]

    def _decode(self, tokens, pos, caches):
        """Logits (B, vocab_size) after tokens (B, T) at positions pos..pos+T, the past in caches.

        The layers hold the caches, and the model is in eval mode (no dropout), only for the length of
        this call, so between two steps of a stream the model is as the caller left it: the caller may
        train it, call forward on it, or drop the stream half-way without leaving stale state behind.
        """
        # Each module's own mode, which a caller may have set apart from the model's, comes back after.
        modes = [(module, module.training) for module in self.modules()] if self.training else []
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache
        try:
            if modes:
                self.eval()
            x = self.tok_embeddings(tokens)
            cos, sin = self.rope_cos[pos : pos + tokens.size(1)], self.rope_sin[pos : pos + tokens.size(1)]
            for layer in self.layers:
                x = layer(x, cos, sin, pos)
            return self.output(self.norm(x[:, -1]))  # only the last position picks the next token
        finally:
            for layer in self.layers:
                layer.attention.cache = None
            for module, training in modes:
                module.training = training

    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) followed by up to max_new_tokens new tokens: (B, T + n). Takes generate_stream's options."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx.long()] + [t[:, None] for t in new], dim=1)

    @classmethod
    def from_pretrained(cls, checkpoint_dir, dtype=None):
        """Load a Hugging Face checkpoint folder of one of HF_ARCHITECTURES: config.json and
        model.safetensors, or the shards listed in model.safetensors.index.json.

        The weights take dtype (a torch dtype or its name, such as "bfloat16"); None means float32.
        """
        folder = Path(checkpoint_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"checkpoint folder {folder} does not exist; pass a folder holding config.json and model.safetensors"
            )
        dtype = torch_dtype(dtype)
        config = config_from_hf(folder)
        # On the meta device the model takes no memory and skips the random initialisation: each
        # parameter becomes its checkpoint tensor below, cast only where dtype differs from the file's,
        # so a bf16 checkpoint loaded in bf16 is never copied, let alone through float32.
        with torch.device("meta"):
            model = cls(config)
        tensors, state = read_safetensors(folder), {}
        for name in model.state_dict():
            if name == "output.weight" and config.tie_embeddings:
                continue  # the embedding matrix, which checkpoints store once; tied again below
            hf_name = to_hf_name(name)
            if hf_name not in tensors:
                raise ValueError(f"{folder} lacks the tensor {hf_name}; it is not the whole model of its config.json")
            state[name] = tensors[hf_name].to(dtype)
        if config.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]  # cast once: a copy is the size of the vocabulary
        try:
            model.load_state_dict(state, assign=True)
        except RuntimeError as e:
            raise ValueError(f"the tensors in {folder} do not fit its config.json: {e}") from None
        if config.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight  # assign gave each name a Parameter of its own
        # The RoPE tables are no parameters: computed afresh, in float32 whatever dtype, as transformers does.
        model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta,
                                                     config.rope_scaling)
        return model


def lm_loss(logits, targets, ignore_index=-100):
    """Mean next-token cross-entropy; targets equal to ignore_index (padding) count for nothing."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


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


# Our parameter names -> Hugging Face's, applied in order to a name such as layers.0.attention.wq.weight.
HF_NAMES = [
    ("tok_embeddings", "embed_tokens"), ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"), ("attention.q_norm", "self_attn.q_norm"),
    ("attention.k_norm", "self_attn.k_norm"),
]


def to_hf_name(name):
    if name == "output.weight":
        return "lm_head.weight"
    for ours, theirs in HF_NAMES:
        name = name.replace(ours, theirs)
    return "model." + name


def config_from_hf(folder):
    """Config from the config.json of a Hugging Face checkpoint folder of one of HF_ARCHITECTURES."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass the folder of a Hugging Face checkpoint")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    architectures = hf.get("architectures") or []
    arch = next((a for a in HF_ARCHITECTURES if a in architectures), None)
    if arch is None:
        raise ValueError(
            f"{folder} holds a {' / '.join(architectures) or hf.get('model_type', 'unknown')} checkpoint; "
            f"gpt_llama.py loads {', '.join(HF_ARCHITECTURES)}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    missing = [k for k in required if not isinstance(hf.get(k), int)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it is not a complete {arch} config")
    # Qwen2's query, key and value biases are built in; attention_bias would add them to all four
    # projections (Llama, Qwen3), and mlp_bias to the feed-forward layer (Llama).
    unsupported = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu" or unsupported:
        raise ValueError(f"{folder}: gpt_llama.py does not support "
                         f"{' and '.join(unsupported) or 'activations other than silu'}")
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older versions write
    # rope_theta and rope_scaling at the top level.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{folder}: RoPE type {rope_type!r} is not supported; gpt_llama.py knows default and llama3")
    # Mistral slides its window in every layer; Qwen2 and Qwen3 only with use_sliding_window, and then
    # in the layers that layer_types names (in older files: layer max_window_layers and those after it).
    n_layers, n_heads, context = hf["num_hidden_layers"], hf["num_attention_heads"], hf["max_position_embeddings"]
    qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    slides = arch == "MistralForCausalLM" or qwen and hf.get("use_sliding_window")
    window = hf.get("sliding_window") if slides else None
    if is_a(window, int) and window >= context:
        window = None  # a window as long as the context hides nothing
    if window is not None and qwen:
        kinds = hf.get("layer_types")  # 28: transformers' default max_window_layers
        windowed = kinds.count("sliding_attention") if kinds else max(n_layers - hf.get("max_window_layers", 28), 0)
        if 0 < windowed < n_layers:
            raise ValueError(f"{folder}: a sliding window in {windowed} of {n_layers} layers is not supported; "
                             "gpt_llama.py slides the same window in every layer or in none")
        window = window if windowed else None
    return Config(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=context,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling={k: rope[k] for k in LLAMA3_SCALING_KEYS} if rope_type == "llama3" else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=window,
    )


def torch_dtype(dtype):
    """The floating-point torch dtype that dtype names: None (float32), a torch dtype or its name."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None, a floating-point torch dtype or its name such as 'bfloat16', "
                         f"not {dtype!r}")
    return dtype


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


if __name__ == "__main__":
    # Fit a tiny model to this file's docstring, with bytes as tokens, then decode from it. One thread:
    # matrices this small gain nothing from a second, which only waits when the cores are busy.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = __doc__.encode()
    data = torch.tensor(list(text))
    model = Model(Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(150):
        offsets = torch.randint(len(data) - 65, (16,))
        batch = torch.stack([data[o : o + 65] for o in offsets])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 149:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"{model.num_params():,} parameters, trained in {time.perf_counter() - start:.1f} s")

    model.eval()
    prompt = data[None, :16]
    sample = model.generate(prompt, 120, temperature=0.8, top_k=40, seed=0)
    print("sample:", repr(bytes(sample[0].tolist()).decode(errors="replace")))

    n = 200
    start = time.perf_counter()
    cached = model.generate(prompt, n, temperature=0)
    t_cached = time.perf_counter() - start
    start = time.perf_counter()
    uncached = prompt
    with torch.no_grad():
        for _ in range(n):  # recompute the whole sequence for every new token
            logits, _ = model(uncached)
            uncached = torch.cat([uncached, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    t_uncached = time.perf_counter() - start
    print(f"greedy, {n} tokens: cached and uncached decoding agree: {torch.equal(cached, uncached)}; "
          f"{n / t_cached:.0f} vs {n / t_uncached:.0f} tokens/s, the cache is {t_uncached / t_cached:.1f}x faster")
