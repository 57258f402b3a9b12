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

Shapes, with B = batch, T = sequence length, C = dim, H = n_heads, K = n_kv_heads, D = head_dim:
    idx             (B, T)          token ids
    x               (B, T, C)       residual stream
    q               (B, H, T, D)    queries, after RoPE
    k, v            (B, K, T, D)    keys and values; each serves H // K query heads
    cos, sin        (T, D)          rotary tables for the positions in use
    logits          (B, T, vocab_size)
"""

import math
from dataclasses import dataclass

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

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


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
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


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
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.cache = None  # a KVCache while generating

    def forward(self, x, cos, sin, pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        # Each query may see keys up to its own position. Without a cache, or for the prompt, that is
        # the plain causal mask; a single new token sees everything cached; a chunk after a cached
        # prefix needs the offset mask spelled out.
        mask, is_causal = None, T > 1
        if T > 1 and pos > 0:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=pos)
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


def lm_loss(logits, targets, ignore_index=-100):
    """Mean next-token cross-entropy; targets equal to ignore_index (padding) count for nothing."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
