"""
PaliGemma: a vision-language model that reads an image and a text prefix and writes a suffix, in one file.

A SigLIP image encoder turns the picture into a sequence of patch vectors, one linear layer maps them
into the width of a Gemma decoder, and the decoder reads [image tokens][prefix] and writes the suffix.
This follows
- PaliGemma (Beyer et al. 2024, https://arxiv.org/abs/2407.07726): the image tokens and the prefix
  (the task, such as "answer en what color?") form one block whose tokens all see each other, a
  prefix-LM mask; only the suffix, the answer, is causal and carries the loss;
- SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343): the ViT of a contrastively trained
  image-text model, used here without its attention-pooling head, so every patch reaches the decoder;
- Gemma (Gemma Team 2024, https://arxiv.org/abs/2403.08295): a LLaMA-like decoder with token embeddings
  scaled by sqrt(width), RMSNorm with weight (1 + w), a GeGLU feed-forward layer, multi-query or
  grouped-query attention with a free head width, RoPE, and an output head tied to the embeddings.
The parameters load from Hugging Face transformers' PaliGemmaForConditionalGeneration (PaliGemma 1,
whose decoder is Gemma) by a rename (Model.from_pretrained).

Shapes, with B = batch, S = image_size, N = (S / patch_size)^2 image tokens, T = text tokens,
L = N + T, Dv = vision_dim, C = dim, H = n_heads, K = n_kv_heads, D = head_dim:
    pixel_values    (B, 3, S, S)    images, normalised to [-1, 1] by preprocess()
    patches         (B, N, Dv)      vision residual stream
    image           (B, N, C)       projected image tokens, the first N positions of the decoder
    input_ids       (B, T)          text: bos, prefix, "\n" (prefix_len tokens), then suffix, eos, padding
    x               (B, L, C)       decoder residual stream
    q               (B, H, L, D)    queries; k, v (B, K, L, D), each serving H // K query heads
    mask            (B, 1, L, L)    True where a query may attend to a key
    logits          (B, T, vocab_size)   only the text positions

From transformers' PaliGemmaProcessor: processor(images=..., text=prefixes, suffix=suffixes) returns
input_ids of n_image_tokens placeholders "<image>", then bos, the prefix, "\n", the suffix and eos,
padded on the tokenizer's padding_side; token_type_ids 0 over placeholders, bos, prefix, "\n" and the
padding, 1 over suffix and eos; and pixel_values as preprocess() makes them. With the padding on the
right (tokenizer.padding_side = "right"), forward takes
    input_ids   = input_ids[:, n_image_tokens:]     (forward puts the image tokens in front itself)
    prefix_len  = ((token_type_ids == 0) & (attention_mask == 1)).sum(1) - n_image_tokens
    targets     = suffix_targets(input_ids, prefix_len, tokenizer.pad_token_id)

`python paligemma.py` draws coloured shapes with pillow, trains a tiny model for a few seconds to answer
"what color?" about them, and answers the question greedily for new drawings.
"""

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


@dataclass
class Config:
    image_size: int = 32
    patch_size: int = 8
    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp_dim: int = 256
    vision_eps: float = 1e-6
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 1  # 1: multi-query attention, as in Gemma 2B; < n_heads: grouped-query attention
    head_dim: int = 32  # Gemma's is free: 256 with a width of 2048 and 8 heads
    ffn_dim: int = 256
    max_seq_len: int = 128  # image tokens plus text tokens
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        sizes = ("image_size", "patch_size", "vision_dim", "vision_layers", "vision_heads", "vision_mlp_dim",
                 "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("vision_eps", "norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_dim % self.vision_heads:
            raise ValueError(f"vision_dim ({self.vision_dim}) must be a multiple of vision_heads ({self.vision_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, as RoPE rotates pairs of coordinates, got {self.head_dim}")
        if self.max_seq_len <= self.n_image_tokens:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must exceed the {self.n_image_tokens} image tokens")

    @property
    def n_image_tokens(self):
        return (self.image_size // self.patch_size) ** 2


TASK = "prefix_lm"  # {"pixel_values": (B, 3, S, S), "input_ids": (B, T), "prefix_len": (B,)}
HF_ARCHITECTURES = ("PaliGemmaForConditionalGeneration",)  # what from_pretrained accepts in a config.json
# How the training log's plot names what this model's runs log.
METRICS = {"accuracy": ("exact match of greedy answers to validation questions", "share right")}
# `python train.py --model paligemma` on a CPU for 5 minutes: shapes of 32 pixels in patches of 4 (64
# image tokens) and up to 32 text tokens, narrow towers. A third vision layer, over 2,500 steps, took the
# shape of held-out colour-shape combinations from 0.0 to 0.5 and 0.33 right (two seeds); a fourth, or
# weight decay 0.1, did not help (README).
TRAIN_RECIPE = dict(
    config=dict(image_size=32, patch_size=4, vision_dim=64, vision_layers=3, vision_heads=4, vision_mlp_dim=256,
                dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, ffn_dim=256, max_seq_len=96),
    vocab_size=512,
    batch_size=32,
    lr=1e-3,
    warmup_steps=50,
    weight_decay=0.0,
    time_budget=300,
    eval_every=100,
)


# copied from siglip.py: Attention (adapted: no last_only)
class Attention(nn.Module):
    """Multi-head self-attention over all positions, with no mask."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        """(B, T, dim) -> (B, T, dim)."""
        B, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, n_heads, T, C / n_heads)
            return t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2)

        q = heads(self.q_proj(x))
        y = F.scaled_dot_product_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(B, -1, C))


# copied from siglip.py: MLP
class MLP(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# copied from siglip.py: EncoderBlock (adapted: no last_only)
class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention, then an MLP, each added to the residual stream."""

    def __init__(self, dim, n_heads, mlp_dim, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x):
        """(B, T, dim) -> (B, T, dim)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# copied from siglip.py: VisionEncoder
class VisionEncoder(nn.Module):
    """ViT: non-overlapping patches, learned position embeddings, encoder blocks, a final LayerNorm.

    forward returns every patch, (B, N, dim), unpooled.
    """

    def __init__(self, image_size, patch_size, dim, n_layers, n_heads, mlp_dim, eps):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        # A convolution whose stride is its size: one linear map applied to each flattened patch.
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Embedding((image_size // patch_size) ** 2, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, n_heads, mlp_dim, eps) for _ in range(n_layers))
        self.post_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, pixel_values):
        S = self.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must have shape (batch, 3, {S}, {S}), got {tuple(pixel_values.shape)}")
        # The convolution, applied as the linear map it is: cheaper, and the patches come out contiguous
        # as (B, N, dim); the convolution's (B, dim, N), transposed, would make every LayerNorm copy them.
        B, P, n = len(pixel_values), self.patch_size, S // self.patch_size
        patches = pixel_values.reshape(B, 3, n, P, n, P).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, 3 * P * P)
        x = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)  # row-major order
        x = x + self.pos_embed.weight
        for block in self.blocks:
            x = block(x)
        return self.post_norm(x)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight w is stored as an offset from one and the scale is (1 + w).

    Unlike LLaMA's, the product with the weight is taken in float32 too, before the cast back, as the
    reference does: under bf16 the order of the two roundings changes the result.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


# copied from gpt_llama.py: rope_tables (adapted: no RoPE scaling)
def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of (max_seq_len, head_dim) for every position, in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
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


class DecoderAttention(nn.Module):
    """Grouped-query attention with RoPE under an explicit mask; heads are head_dim wide, whatever dim is."""

    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.cache = None  # a KVCache while generating

    def forward(self, x, cos, sin, mask, pos=0, first=0):
        """mask (B, 1, T, T) or (B, 1, 1, T), or None, where None lets every query see every key (cached
        ones included). Every position gives a key and a value; only those from first on ask a query."""
        B, T, _ = x.shape
        q = self.wq(x[:, first:]).view(B, T - first, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[..., first:, :], sin[..., first:, :]), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        if mask is not None and mask.size(2) > 1:
            mask = mask[:, :, first:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T - first, -1))


class GeGLU(nn.Module):
    """w2(gelu_tanh(w1 x) * w3 x): SwiGLU's gate with GELU (tanh approximation) in place of SiLU."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention = DecoderAttention(c)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.feed_forward = GeGLU(c.dim, c.ffn_dim)

    def forward(self, x, cos, sin, mask, pos=0, first=0):
        """Outputs of the positions from first on; the earlier ones still serve as keys and values."""
        x = x[:, first:] + self.attention(self.attention_norm(x), cos, sin, mask, pos, first)
        return x + self.feed_forward(self.ffn_norm(x))


def prefix_lm_mask(block_len, length):
    """(B, 1, length, length) bool mask: causal, except that the first block_len[b] positions of row b
    (image and prefix) all see each other. Padding after the suffix needs no mask of its own: being
    last, it is seen only by later padding, whose outputs nobody reads."""
    i = torch.arange(length, device=block_len.device)
    in_block = i[None, :] < block_len[:, None]  # (B, length)
    causal = i[None, :, None] >= i[None, None, :]  # (1, query, key)
    return (causal | (in_block[:, :, None] & in_block[:, None, :]))[:, None]


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.vision = VisionEncoder(c.image_size, c.patch_size, c.vision_dim, c.vision_layers, c.vision_heads,
                                    c.vision_mlp_dim, c.vision_eps)
        self.projector = nn.Linear(c.vision_dim, c.dim)
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        # The reference counts positions from 1, so the tables hold one row more and are read from row 1.
        # RoPE depends only on the distance between positions, so this changes nothing but rounding.
        cos, sin = rope_tables(c.head_dim, c.max_seq_len + 1, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # Xavier-uniform matrices, as in siglip.py: with N(0, 0.02) ones the demo's tiny model learned to
        # read the image much later (in 300 steps, barely). Embeddings N(0, 0.02), scaled up by sqrt(dim).
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def embed_image(self, pixel_values):
        """(B, 3, S, S) -> (B, N, dim). Not scaled: the sqrt(dim) below is for text embeddings only, which
        is why transformers before 4.45 divided image features by sqrt(dim) before scaling everything."""
        return self.projector(self.vision(pixel_values))

    def embed_text(self, ids):
        """(B, T) -> (B, T, dim), scaled by sqrt(dim) rounded to the embedding dtype, as the reference does:
        the embeddings are initialised small, and the scale brings them to the residual stream's size."""
        w = self.tok_embeddings.weight
        return self.tok_embeddings(ids) * torch.tensor(self.config.dim**0.5, dtype=w.dtype, device=w.device)

    def decoder(self, x, mask, pos=0, positions=None, first=0):
        """The decoder on embeddings x (B, T, dim), cached from index pos -> logits (B, T - first, vocab_size)
        of the positions from first on. The image tokens (in training) and the prompt (in decoding) need
        no logits, so the head and the last block, whose outputs feed only the head, skip them: the last
        block still takes every position's key and value.

        positions: RoPE positions (T,) or, for left-padded rows, (B, T); by default pos..pos+T.
        """
        if positions is None:
            positions = torch.arange(pos, pos + x.size(1), device=x.device)
        cos, sin = self.rope_cos[positions + 1], self.rope_sin[positions + 1]
        if positions.dim() == 2:  # (B, T, D) -> (B, 1, T, D), the same for every head
            cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, pos, first if i == len(self.layers) - 1 else 0)
        return F.linear(self.norm(x), self.tok_embeddings.weight)  # tied head

    def forward(self, pixel_values, input_ids, prefix_len, targets=None):
        """Logits (B, T, vocab_size) over the text positions of input_ids (B, T), after the image tokens.

        prefix_len (B,): how many text tokens (bos, prefix and "\\n") belong to the bidirectional block.
        targets (B, T): the token each text position must predict, -100 where it counts for nothing;
        suffix_targets builds them so that only the suffix and its eos are scored. The loss is their mean
        cross-entropy, or None without targets.
        """
        B, T = input_ids.shape
        N, c = self.config.n_image_tokens, self.config
        if N + T > c.max_seq_len:
            raise ValueError(f"{N} image tokens plus {T} text tokens exceed the context of {c.max_seq_len}")
        prefix_len = torch.as_tensor(prefix_len)
        # Reading prefix_len's values would make each step wait for a GPU and break a compiled graph, so
        # they are checked only in eager mode on the CPU, where that costs nothing. A training pipeline
        # builds its batches right (this project's images.py does), and generate checks its own input.
        if prefix_len.device.type == "cpu" and not torch.compiler.is_compiling():
            if prefix_len.min() < 1 or prefix_len.max() > T:
                raise ValueError(f"prefix_len must lie in [1, {T}], got {prefix_len.tolist()}")
        prefix_len = prefix_len.to(input_ids.device).expand(B)
        x = torch.cat([self.embed_image(pixel_values), self.embed_text(input_ids)], dim=1)
        logits = self.decoder(x, prefix_lm_mask(N + prefix_len, N + T), first=N)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head is the embedding, counted once

    def generate_stream(self, pixel_values, prefix_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_id=None, seed=None, prefix_len=None):
        """Yield up to max_new_tokens (B,) tensors of new tokens after the images (B, 3, S, S) and the
        prefixes prefix_ids (B, T) (bos, prefix, "\\n"): of equal length, or, with prefix_len (B,), row b
        holding its prefix in its last prefix_len[b] places, after padding of any id.

        The vision tower runs once; image and prefix go through the decoder in one pass, all seeing each
        other, and fill a KV cache; then each new token, which sees everything before it, is one step.
        Padding is masked out as a key, and the positions of the tokens after it are counted without it,
        so a padded row gets what it would get alone.
        temperature 0 is greedy. A row that has produced eos_id keeps yielding it, and the stream ends
        once every row has. seed makes sampling reproducible without touching torch's global state.
        """
        if not (isinstance(prefix_ids, torch.Tensor) and prefix_ids.dim() == 2 and prefix_ids.numel() > 0
                and not prefix_ids.is_floating_point()):
            raise ValueError("prefix_ids must be a non-empty (batch, time) tensor of integer token ids")
        (B, T), N, c = prefix_ids.shape, self.config.n_image_tokens, self.config
        if len(pixel_values) != B:
            raise ValueError(f"{len(pixel_values)} images for {B} prefixes; give one image per prefix")
        if N + T + max_new_tokens > c.max_seq_len:
            raise ValueError(f"{N} image tokens, a prefix of {T} and {max_new_tokens} new tokens exceed the "
                             f"context of {c.max_seq_len}; shorten the prefix or ask for fewer tokens")
        if prefix_ids.min() < 0 or prefix_ids.max() >= c.vocab_size:
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got {prefix_ids.min()}..{prefix_ids.max()}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1) or (
                top_p is not None and not 0 < top_p <= 1):
            raise ValueError("need max_new_tokens >= 0, temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_k}, {top_p}")
        generator = None if seed is None else torch.Generator(device=prefix_ids.device).manual_seed(seed)
        w = self.tok_embeddings.weight
        caches = [KVCache(B, c.n_kv_heads, N + T + max_new_tokens, c.head_dim, w.dtype, w.device)
                  for _ in self.layers]
        done = torch.zeros(B, dtype=torch.bool, device=prefix_ids.device)
        # Row b: image tokens, pad[b] padding tokens, then its prefix and the new tokens.
        pad = T - torch.as_tensor(T if prefix_len is None else prefix_len, device=prefix_ids.device).expand(B)
        if pad.min() < 0 or pad.max() >= T:
            raise ValueError(f"prefix_len must lie in [1, {T}], got {(T - pad).tolist()}")
        index = torch.arange(N + T + max_new_tokens, device=prefix_ids.device)
        is_pad = (index[None] >= N) & (index[None] < N + pad[:, None])  # (B, L)
        positions = index[None] - pad[:, None] * (index[None] >= N)  # padding takes no position
        with torch.inference_mode():
            x = torch.cat([self.embed_image(pixel_values), self.embed_text(prefix_ids.long())], dim=1)
        pos = 0
        for _ in range(max_new_tokens):
            # Per step, not around the yield, so that inference mode never leaks into the caller's code.
            with torch.inference_mode():
                # The prompt is one bidirectional block, and a new token sees all that came before: the
                # only keys to hide are padding, and without padding nothing needs a mask.
                end = pos + x.size(1)
                mask = ~is_pad[:, None, None, :end] if pad.any() else None
                logits = self._decode(x, pos, caches, mask, positions[:, pos:end])
                pos += x.size(1)
                tokens = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    tokens = tokens.masked_fill(done, eos_id)
                    done |= tokens == eos_id
                x = self.embed_text(tokens[:, None])
            tokens = tokens.clone()  # an inference tensor could not enter a later training step
            yield tokens
            if eos_id is not None and done.all():
                return

    def _decode(self, x, pos, caches, mask, positions):
        """Logits (B, vocab_size) of the last of the embeddings x, cached from index pos, the past in
        caches, which the layers hold only for the length of this call."""
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache
        try:
            return self.decoder(x, mask, pos, positions, first=x.size(1) - 1)[:, 0]
        finally:
            for layer in self.layers:
                layer.attention.cache = None

    def generate(self, pixel_values, prefix_ids, max_new_tokens, **kwargs):
        """prefix_ids (B, T) followed by up to max_new_tokens new tokens: (B, T + n). Takes generate_stream's options."""
        new = list(self.generate_stream(pixel_values, prefix_ids, max_new_tokens, **kwargs))
        return torch.cat([prefix_ids.long()] + [t[:, None] for t in new], dim=1)

    @classmethod
    def from_pretrained(cls, checkpoint_dir):
        """Load a Hugging Face PaliGemmaForConditionalGeneration folder (PaliGemma 1): config.json and
        model.safetensors, or the shards of model.safetensors.index.json. The weights are cast to float32."""
        folder = Path(checkpoint_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass a folder holding config.json")
        config = config_from_hf(folder)
        # On the meta device the model takes no memory and skips the random initialisation: each parameter
        # becomes its checkpoint tensor below, so the weights are never held twice.
        with torch.device("meta"):
            model = cls(config)
        # Checkpoints name the towers with or without a leading "model." and "vision_model." or "model."
        # inside them, as transformers' versions wrote them; drop those parts on both sides.
        tensors = read_safetensors(folder)
        file_names = {canonical(k): k for k in tensors}
        state = {}
        for name in model.state_dict():
            hf_name = canonical(to_hf_name(name))
            if hf_name not in file_names:
                raise ValueError(f"{folder} lacks the tensor {hf_name}; it is not a whole PaliGemma checkpoint")
            state[name] = tensors.pop(file_names[hf_name]).float()
        # A checkpoint may also store the tied output head, which must then be the embedding again.
        head = next((k for k in tensors if k.endswith("lm_head.weight")), None)
        if head is not None and not torch.equal(tensors.pop(head).float(), state["tok_embeddings.weight"]):
            raise ValueError(f"{folder} holds an output head that differs from the embedding; PaliGemma's head is tied to it")
        # transformers builds SigLIP's pooling head into the vision tower unless the vision config says
        # vision_use_head=False; PaliGemma hands every patch to the projector and never uses it.
        pooling_head = [k for k in tensors if canonical(k).startswith("vision_tower.head.")]
        if pooling_head:
            print(f"note: {folder} holds SigLIP's pooling head (vision_tower.head.*, {len(pooling_head)} tensors), "
                  "which PaliGemma does not use; skipped", file=sys.stderr)
        # Older checkpoints also store the position-id buffers, which hold only 0, 1, 2, ...
        unexpected = sorted(k for k in tensors if not k.endswith("position_ids") and k not in pooling_head)
        if unexpected:
            raise ValueError(f"{folder} holds tensors that PaliGemma does not have: {', '.join(unexpected[:5])}")
        try:
            model.load_state_dict(state, assign=True)
        except RuntimeError as e:
            raise ValueError(f"the tensors in {folder} do not fit its config.json: {e}") from None
        # The RoPE tables are no parameters: computed afresh, in float32, as transformers does.
        model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len + 1, config.rope_theta)
        return model


def suffix_targets(input_ids, prefix_len, pad_id=None):
    """targets (B, T) for forward: position t predicts input_ids[:, t + 1] where that token belongs to
    the suffix (index >= prefix_len) and is not pad_id; -100 elsewhere. The last prefix position ("\\n")
    thus predicts the first suffix token, and the prefix itself is never scored."""
    B, T = input_ids.shape
    nxt = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    index = torch.arange(1, T + 1, device=input_ids.device)
    keep = (index[None] >= torch.as_tensor(prefix_len, device=input_ids.device).view(-1, 1)) & (index[None] < T)
    if pad_id is not None:
        keep &= nxt != pad_id
    return nxt.masked_fill(~keep, -100)


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


# copied from siglip.py: to_rgb
def to_rgb(image):
    """A pillow image of any common mode as an RGB image.

    As transformers' SiglipImageProcessor does, transparent pixels are composited onto white (an
    image with alpha, or a palette or grey image with a transparent colour). Unlike pillow's own
    conversion, which clips everything above 255 to white, 16-bit grey (I;16, and I holding values
    above 255, the way some decoders return 16-bit data) is scaled to 8 bits; F is taken on the 0..255
    scale, as pillow takes it. Alpha is told by the mode, so LAB's "A" channel is not taken for alpha
    (transformers looks for a band named "A").
    """
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        grey = np.asarray(image, dtype=np.float64).clip(0, 65535) * (255 / 65535)
        image = Image.fromarray(np.round(grey).astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


# copied from siglip.py: preprocess
def preprocess(image, image_size):
    """A pillow image -> (3, image_size, image_size) float tensor; a list of images -> (N, 3, S, S).

    SiglipImageProcessor's defaults: RGB (to_rgb), resized to a square with bicubic interpolation
    whatever the aspect ratio, scaled to [0, 1] and normalised with mean 0.5 and std 0.5 to [-1, 1].
    """
    if isinstance(image, (list, tuple)):
        return torch.stack([preprocess(im, image_size) for im in image])
    pixels = np.asarray(to_rgb(image).resize((image_size, image_size), Image.Resampling.BICUBIC))
    # The reference's arithmetic, to the last bit: rescale in float64, normalise in float32.
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


# Our parameter names -> Hugging Face's (after canonical), applied in order.
HF_NAMES = [
    ("vision.", "vision_tower."), ("patch_embed", "embeddings.patch_embedding"),
    ("pos_embed", "embeddings.position_embedding"), ("blocks.", "encoder.layers."), ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"), ("attn.", "self_attn."), ("post_norm", "post_layernorm"),
    ("projector", "multi_modal_projector.linear"), ("tok_embeddings", "embed_tokens"),
    ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"), ("attention.wv", "self_attn.v_proj"),
    ("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
    ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
]


def to_hf_name(name):
    for ours, theirs in HF_NAMES:
        name = name.replace(ours, theirs)
    return name if name.startswith(("vision_tower.", "multi_modal_projector.")) else "language_model." + name


def canonical(name):
    """A checkpoint's tensor name without the wrappers that differ between transformers' versions."""
    name = name.removeprefix("model.")
    for wrapper in ("vision_tower.vision_model.", "language_model.model."):
        if name.startswith(wrapper):
            name = wrapper.split(".")[0] + "." + name[len(wrapper):]
    return name


# transformers' PaliGemma defaults (the 3B model), which config.json files leave out when they match.
HF_TEXT_DEFAULTS = dict(model_type="gemma", vocab_size=257216, hidden_size=2048, intermediate_size=16384,
                        num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                        hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=8192)
HF_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          num_channels=3, image_size=224, patch_size=14, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6)


def config_from_hf(folder):
    """Config from the config.json of a Hugging Face PaliGemma checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass the folder of a Hugging Face PaliGemma checkpoint")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    architectures = hf.get("architectures") or []
    if not set(architectures) & set(HF_ARCHITECTURES):
        raise ValueError(f"{folder} holds a {' / '.join(architectures) or hf.get('model_type', 'unknown')} "
                         f"checkpoint; paligemma.py loads {', '.join(HF_ARCHITECTURES)}")
    text = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    vision = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if text["model_type"] != "gemma":
        raise ValueError(f"{folder} is a PaliGemma 2 checkpoint (a {text['model_type']} decoder, with logit "
                         "soft-capping and sliding-window layers); paligemma.py loads PaliGemma 1, whose decoder is Gemma")
    activation = text.get("hidden_activation") or text["hidden_act"]
    rope = text.get("rope_parameters") or {}
    problems = []
    if {activation, vision["hidden_act"]} != {"gelu_pytorch_tanh"}:
        problems.append(f"activations {activation} / {vision['hidden_act']} (only gelu_pytorch_tanh)")
    if vision["num_channels"] != 3:
        problems.append(f"{vision['num_channels']} image channels (only 3)")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE type {rope['rope_type']!r} (only default)")
    if hf.get("projection_dim", text["hidden_size"]) != text["hidden_size"]:
        problems.append("a projector whose width differs from the decoder's")
    if problems:
        raise ValueError(f"{folder}: paligemma.py does not support {'; '.join(problems)}")
    return Config(
        image_size=vision["image_size"], patch_size=vision["patch_size"], vision_dim=vision["hidden_size"],
        vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
        vision_mlp_dim=vision["intermediate_size"], vision_eps=vision["layer_norm_eps"],
        vocab_size=text["vocab_size"], dim=text["hidden_size"], n_layers=text["num_hidden_layers"],
        n_heads=text["num_attention_heads"], n_kv_heads=text["num_key_value_heads"], head_dim=text["head_dim"],
        ffn_dim=text["intermediate_size"], max_seq_len=text["max_position_embeddings"],
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)), norm_eps=text["rms_norm_eps"],
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


# copied from llm_machinery/images.py: draw_shape
def draw_shape(pen, shape, cx, cy, r, fill):
    """A circle, square or triangle of half-width r centred on (cx, cy), with a pillow ImageDraw pen."""
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


if __name__ == "__main__":
    # Pictures of coloured shapes, text as UTF-8 bytes with bos 256, eos 257 and padding 258, a tiny model
    # trained for a few seconds to answer "what color?", then greedy answers about new pictures. One
    # thread: matrices this small gain nothing from a second.
    from PIL import ImageDraw

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    BOS, EOS, PAD = 256, 257, 258
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
    shapes = ("circle", "square", "triangle")
    prefix = [BOS] + list(b"answer en what color?\n")  # bos, the task, "\n": the bidirectional block

    def draw(colour, shape):
        image = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(200, 256, 3)))
        r, cx, cy = rng.integers(7, 11), rng.integers(12, 21), rng.integers(12, 21)
        fill = tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for v in colours[colour])
        draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill)
        return image

    def text_ids(colour):
        """[bos prefix \n][colour eos][padding], 32 tokens."""
        ids = prefix + list(colour.encode()) + [EOS]
        return ids + [PAD] * (32 - len(ids))

    config = Config(image_size=16, patch_size=4, vocab_size=259, dim=64, n_heads=4, n_kv_heads=1, head_dim=16,
                    ffn_dim=128, max_seq_len=64)
    model = Model(config)
    pool = [(c, s) for c in colours for s in shapes] * 32
    images = preprocess([draw(c, s) for c, s in pool], config.image_size)
    ids = torch.tensor([text_ids(c) for c, _ in pool])
    prefix_len = torch.full((len(pool),), len(prefix))
    targets = suffix_targets(ids, prefix_len, PAD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start, steps = time.perf_counter(), 200
    for step in range(steps):
        for group in optimizer.param_groups:  # warmup, then cosine decay
            group["lr"] = 3e-3 * min(1, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(len(pool), (32,))
        _, loss = model(images[pick], ids[pick], prefix_len[pick], targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"{model.num_params():,} parameters, trained in {time.perf_counter() - start:.1f} s")

    truth = [(list(colours)[i % 3], shapes[i // 3 % 3]) for i in range(36)]
    new_images = preprocess([draw(c, s) for c, s in truth], config.image_size)
    out = model.generate(new_images, torch.tensor([prefix] * len(truth)), 8, temperature=0, eos_id=EOS)
    answers = [bytes(t for t in row if t < 256).decode(errors="replace") for row in out[:, len(prefix):].tolist()]
    for (c, s), answer in list(zip(truth, answers))[:6]:
        print(f"a new {c + ' ' + s:15s} 'answer en what color?' -> {answer!r}")
    right = sum(answer == c for (c, _), answer in zip(truth, answers))
    print(f"{right} of {len(truth)} new pictures answered right (chance: a third)")
