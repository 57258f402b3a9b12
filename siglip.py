"""
SigLIP: a contrastive image-text model trained with the pairwise sigmoid loss, in one file.

Two encoders map an image and a caption to vectors of the same width; after L2 normalisation their dot
product, scaled by a learned temperature t and shifted by a learned bias b, is the logit that the
caption describes the image. This follows
- SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343): every (image, text) pair of a batch is
  an independent binary classification, so the loss needs no softmax over the batch and splits into
  blocks of texts and across processes;
- the Vision Transformer, ViT (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929): patches
  of the image are tokens of a pre-LayerNorm transformer encoder;
- the multi-head attention pooling head, MAP (Zhai et al. 2022, https://arxiv.org/abs/2106.04560):
  one learned query attends over all patches to pool the image into one vector.
The parameters are laid out as in Hugging Face transformers' SiglipModel, so checkpoints load by a
rename (Model.from_pretrained).

Shapes, with B = batch, S = image_size, P = patch_size, N = (S / P)^2 patches, T = max_seq_len,
Dv = vision_dim, Dt = text_dim:
    pixel_values    (B, 3, S, S)    images, normalised to [-1, 1] by preprocess()
    patches         (B, N, Dv)      vision residual stream
    input_ids       (B, T)          captions, every one padded to exactly T tokens (see TextEncoder)
    tokens          (B, T, Dt)      text residual stream
    image, text     (B, Dv)         pooled embeddings; the text head projects Dt to Dv
    logits          (B_images, B_texts)   t * cos(image_i, text_j) + b

`python siglip.py` draws coloured shapes with pillow, trains a tiny model on them for a few seconds
and classifies new drawings zero-shot.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint


@dataclass
class Config:
    image_size: int = 32
    patch_size: int = 8
    vision_dim: int = 64  # also the width of the shared embedding space
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp_dim: int = 256
    vocab_size: int = 512
    max_seq_len: int = 16  # the fixed length every caption is padded to
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_mlp_dim: int = 256
    norm_eps: float = 1e-6
    # Which pairs of a batch count as matches. "diagonal": only image i with its own caption i, as in
    # the paper. "same_text": image i also matches every caption whose token ids equal its own, which
    # is the truth when captions repeat ("a handwritten seven"): "diagonal" then labels -1 a caption
    # that describes the image exactly. Measured (README), these false negatives cost no accuracy by
    # the end of a run, while "same_text" starts slower: b = -10 expects one match per row, and with
    # ten distinct captions a tenth of the pairs match. So the paper's labelling is the default.
    positives: str = "diagonal"
    loss_chunk_size: int = 1024  # texts per block of the loss: memory grows with images x this

    def __post_init__(self):
        sizes = ("image_size", "patch_size", "vision_dim", "vision_layers", "vision_heads", "vision_mlp_dim",
                 "vocab_size", "max_seq_len", "text_dim", "text_layers", "text_heads", "text_mlp_dim",
                 "loss_chunk_size")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        for tower in ("vision", "text"):
            dim, heads = getattr(self, f"{tower}_dim"), getattr(self, f"{tower}_heads")
            if dim % heads:
                raise ValueError(f"{tower}_dim ({dim}) must be a multiple of {tower}_heads ({heads})")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.positives not in ("same_text", "diagonal"):
            raise ValueError(f"positives must be 'same_text' or 'diagonal', got {self.positives!r}")


# The pipeline feeds it {"pixel_values": (B, 3, S, S), "input_ids": (B, max_seq_len)}, and "gather": True when
# several processes train.
TASK = "image_text"
HF_ARCHITECTURES = ("SiglipModel",)  # what from_pretrained accepts in a config.json
# What Model.metrics() returns and what evaluations log, in words and units, for the training log's plot (plot.py).
METRICS = {
    "loss": ("loss: the pairwise sigmoid loss", "nats per image"),
    "t": ("temperature t = exp(t')", "logit scale"),
    "b": ("bias b", "logit"),
    "gap": ("logit of matching pairs minus the others'", "logit"),
    "acc": ("training batch: images whose best caption is their own", "share right"),
    "accuracy": ("zero-shot accuracy on validation images", "share right"),
}
# Defaults of `python train.py --model siglip`: five minutes on two CPU cores. At this budget a
# narrower model (64 wide, 0.2M parameters) that takes over twice the steps beat a 96-wide, 3-layer one
# (zero-shot 0.83 against 0.39 on shapes after 150 s on shared cores), and the same recipe reaches
# 0.97 on a real folder of 1,600 digit scans in three minutes; lr 3e-3 trained unevenly.
TRAIN_RECIPE = dict(
    config=dict(image_size=32, patch_size=4, vision_dim=64, vision_layers=2, vision_heads=4, vision_mlp_dim=256,
                max_seq_len=16, text_dim=64, text_layers=1, text_heads=4, text_mlp_dim=256),
    vocab_size=512,
    batch_size=64,
    lr=2e-3,
    warmup_steps=50,
    weight_decay=0.1,
    time_budget=300,
    eval_every=100,
)


class Attention(nn.Module):
    """Multi-head self-attention over all positions, with no mask."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, last_only=False):
        """(B, T, dim) -> (B, T, dim), or (B, 1, dim) with last_only."""
        # last_only: only the last position asks a query, though it still attends to every position, for a
        # last block whose other outputs nobody reads.
        B, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, n_heads, T, C / n_heads)
            return t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2)

        q = heads(self.q_proj(x[:, -1:] if last_only else x))
        y = F.scaled_dot_product_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(B, -1, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention, then an MLP, each added to the residual stream."""

    def __init__(self, dim, n_heads, mlp_dim, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x, last_only=False):
        """(B, T, dim) -> (B, T, dim), or (B, 1, dim) with last_only (see Attention)."""
        x = (x[:, -1:] if last_only else x) + self.attn(self.norm1(x), last_only)
        return x + self.mlp(self.norm2(x))


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the patches, then a residual MLP.

    The query, key and value projections are one (3 * dim, dim) matrix, the layout of
    torch.nn.MultiheadAttention that checkpoints store.

    With a single query, attention needs neither the keys nor the values of the patches x_n. In each
    head, with q the probe's query (already divided by sqrt(head_dim)) and W_k, b_k, W_v, b_v that
    head's rows of the key and value projections,
        score_n = q . (W_k x_n + b_k) = (W_k^T q) . x_n + q . b_k,
    whose last term is the same for every patch and cancels in the softmax; and, as the weights a_n
    sum to one,
        sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v.
    So each head scores the patches with one vector and projects one weighted mean of them: what
    nn.MultiheadAttention computes, without its (B * N, dim) x (dim, 2 * dim) key and value projection.
    Measured against that plain form (keys and values of every patch, scaled_dot_product_attention),
    forward and backward of the head on one CPU thread: 1.4 ms against 3.7 ms at TRAIN_RECIPE's shapes
    (65 against 69 ms for a whole training step), 48 ms against 520 ms at ViT-B/16's (batch 32, 196
    patches, width 768, 12 heads).
    """

    def __init__(self, dim, n_heads, mlp_dim, eps):
        super().__init__()
        self.n_heads = n_heads
        self.probe = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def pooling_weights(self, x):
        """(B, H, N): how much each head of the probe attends to each of the patches x (B, N, dim).

        A method of its own, which forward pools with, so that `sample.py --show` draws the very weights
        the model computes: it calls this on the patches that reach the head."""
        C = x.size(-1)
        H, D = self.n_heads, C // self.n_heads
        w_q, w_k, _ = self.in_proj.weight.split(C)
        q = F.linear(self.probe[0, 0], w_q, self.in_proj.bias[:C]).view(H, 1, D) / math.sqrt(D)
        w_score = (q @ w_k.view(H, D, C)).view(H, C)  # row h: W_k^T q of head h; the key bias cancels
        return F.linear(x, w_score).transpose(1, 2).softmax(dim=-1)

    def forward(self, x):
        """(B, N, dim) patches -> (B, dim)."""
        B, N, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        w_v, b_v = self.in_proj.weight[2 * C :], self.in_proj.bias[2 * C :]
        pooled = self.pooling_weights(x) @ x  # (B, H, C): per head, the weighted mean of the patches
        y = self.out_proj(torch.einsum("bhc,hdc->bhd", pooled, w_v.view(H, D, C)).reshape(B, C) + b_v)
        return y + self.mlp(self.norm(y))


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


class TextEncoder(nn.Module):
    """Token and learned position embeddings, encoder blocks, a final LayerNorm, and a linear head on
    the output at the LAST position.

    There is no causal mask and, as in the reference, no mask over padding either: every position
    sees every other, padding included, and the pooled vector is whatever the last position holds.
    So "a red circle" padded to 16 tokens and the same words padded to 64 are different inputs with
    different embeddings, and a caption long enough to fill the window puts a word, not padding, at
    the pooled position. Training and inference must therefore pad every caption to the same fixed
    length (max_seq_len) with the same pad token; the released SigLIP models were trained with
    captions padded to 64 tokens, which is why their tokenizer must be called with
    padding="max_length". forward refuses any other length.
    """

    def __init__(self, vocab_size, max_seq_len, dim, n_layers, n_heads, mlp_dim, out_dim, eps):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, n_heads, mlp_dim, eps) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, input_ids):
        """(B, max_seq_len) token ids -> (B, out_dim)."""
        if input_ids.dim() != 2 or input_ids.size(1) != self.max_seq_len or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids of shape (batch, {self.max_seq_len}), padded to "
                             f"max_seq_len; got shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}")
        x = self.tok_embed(input_ids) + self.pos_embed.weight
        # Only the last position is pooled, so the last block computes only that position: it needs the
        # keys and values of every position, but the others' queries, attention and MLP would be wasted.
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        return self.head(self.final_norm(x[:, -1]))


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.vision = VisionEncoder(c.image_size, c.patch_size, c.vision_dim, c.vision_layers, c.vision_heads,
                                    c.vision_mlp_dim, c.norm_eps)
        self.vision_head = MAPHead(c.vision_dim, c.vision_heads, c.vision_mlp_dim, c.norm_eps)
        self.text = TextEncoder(c.vocab_size, c.max_seq_len, c.text_dim, c.text_layers, c.text_heads, c.text_mlp_dim,
                                c.vision_dim, c.norm_eps)
        # The paper's initialisation, t' = log 10 and b = -10: all but B of the B^2 pairs of a batch are
        # negatives, and a bias that already says "no match" spares the first steps a large correction
        # towards that prior.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))  # t' with t = exp(t')
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))
        self.apply(self._init_weights)
        self._last = {}

    @staticmethod
    def _init_weights(module):
        # Close to big_vision's: Xavier-uniform matrices and zero biases; embeddings with variance
        # 1 / width and the patch projection with variance 1 / fan_in.
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.weight.size(1) ** -0.5)
        elif isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            nn.init.zeros_(module.bias)

    def encode_image(self, pixel_values):
        """(B, 3, S, S) -> (B, vision_dim) pooled image embeddings, not normalised."""
        return self.vision_head(self.vision(pixel_values))

    def encode_text(self, input_ids):
        """(B, max_seq_len) -> (B, vision_dim) pooled text embeddings, not normalised."""
        return self.text(input_ids)

    def forward(self, pixel_values, input_ids, return_loss=True, gather=False):
        """Logits (B, B) of image i against caption j of this process, and the sigmoid loss if asked.

        gather: the loss covers this process's images against the captions of every process of
        torch.distributed (see sigmoid_loss); the logits cover only the local pairs either way.
        """
        image = F.normalize(self.encode_image(pixel_values).float(), dim=-1)
        text = F.normalize(self.encode_text(input_ids).float(), dim=-1)
        t, b = self.logit_scale.float().exp(), self.logit_bias.float()
        logits = t * image @ text.T + b
        ids = input_ids if self.config.positives == "same_text" else None
        loss = sigmoid_loss(image, text, t, b, ids, self.config.loss_chunk_size, gather) if return_loss else None
        # Only kept: metrics() computes its numbers when asked, at a logged step, not in every forward.
        self._last = dict(logits=logits.detach(), input_ids=input_ids, t=t.detach(), b=b.detach())
        return logits, loss

    def metrics(self):
        """About the last forward: t = exp(t'), b, the mean logit of matching pairs minus that of the
        others (gap), and the share of images whose best caption in the batch is a match (acc).

        Whatever the loss labels, a caption with the same text as an image's own is a right answer here.
        A collapsed model gives every pair the same logit: a gap of 0, and acc no better than the share of
        matching captions.
        """
        if not self._last:
            return {}
        logits, ids = self._last["logits"].float(), self._last["input_ids"]
        positive = (ids[:, None] == ids[None]).all(-1).float()
        negatives = (1 - positive).sum().clamp(min=1)  # a batch of one caption has none
        gap = (logits * positive).sum() / positive.sum() - (logits * (1 - positive)).sum() / negatives
        acc = positive.gather(1, logits.argmax(1, keepdim=True)).mean()
        return dict(t=self._last["t"].item(), b=self._last["b"].item(), gap=gap.item(), acc=acc.item())

    @torch.no_grad()
    def classify(self, pixel_values, label_ids):
        """Zero-shot classification: (N_images, N_labels) probabilities, each row summing to one.

        label_ids (N_labels, max_seq_len) are the label captions ("a photo of a cat", ...), padded as
        in training. The sigmoid of a logit is SigLIP's probability that one caption fits; those
        neither exclude one another nor sum to one. To choose one label among exclusive ones, this
        takes the softmax of the logits over the labels instead (the bias b cancels): the same
        ranking, as a distribution.
        """
        image = F.normalize(self.encode_image(pixel_values).float(), dim=-1)
        text = F.normalize(self.encode_text(label_ids).float(), dim=-1)
        return (self.logit_scale.float().exp() * image @ text.T).softmax(dim=-1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per (image, caption) pair, counted as in PaLM (https://arxiv.org/abs/2204.02311)
        appendix B: 6 per weight of a matmul per token it touches (forward and backward), and 12 * T * D
        per query per layer for attention over T keys. Left out: the loss, O(batch * dim) per pair, and
        the MAP head's query, computed once per batch."""
        c = self.config
        N, T, Dv, Dt = (c.image_size // c.patch_size) ** 2, c.max_seq_len, c.vision_dim, c.text_dim
        vision_block = 4 * Dv * Dv + 2 * Dv * c.vision_mlp_dim
        text_block = 4 * Dt * Dt + 2 * Dt * c.text_mlp_dim
        # MAP head: each head scores every patch and pools them (two matmuls of N x Dv per head); the
        # value and output projections and the MLP once.
        vision = N * (3 * c.patch_size ** 2 * Dv + c.vision_layers * vision_block + 2 * c.vision_heads * Dv)
        vision += 2 * Dv * Dv + 2 * Dv * c.vision_mlp_dim
        # The last text block: keys and values at every position, the rest at the last one only.
        text = T * (c.text_layers - 1) * text_block + T * 2 * Dt * Dt + (text_block - 2 * Dt * Dt) + Dt * Dv
        attention = c.vision_layers * N * N * Dv + ((c.text_layers - 1) * T + 1) * T * Dt
        return 6 * (vision + text) + 12 * attention

    @classmethod
    def from_pretrained(cls, checkpoint_dir):
        """Load a Hugging Face SiglipModel folder: config.json and model.safetensors, or the shards listed
        in model.safetensors.index.json. Weights, t' and b come from the checkpoint, cast to float32."""
        folder = Path(checkpoint_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"checkpoint folder {folder} does not exist; pass a folder holding config.json and model.safetensors"
            )
        # On the meta device the model takes no memory and skips the random initialisation: each parameter
        # becomes its checkpoint tensor below, so the weights are never held twice.
        with torch.device("meta"):
            model = cls(config_from_hf(folder))
        tensors = read_safetensors(folder)
        state = {}
        for name in model.state_dict():
            hf_name = to_hf_name(name)
            if hf_name not in tensors:
                raise ValueError(f"{folder} lacks the tensor {hf_name}; it is not a whole SiglipModel checkpoint")
            state[name] = tensors.pop(hf_name).float()
        # Older checkpoints also store the position-id buffers, which hold only 0, 1, 2, ...
        unexpected = sorted(k for k in tensors if not k.endswith("position_ids"))
        if unexpected:
            raise ValueError(f"{folder} holds tensors that SiglipModel does not have: {', '.join(unexpected[:5])}")
        try:
            model.load_state_dict(state, assign=True)
        except RuntimeError as e:
            raise ValueError(f"the tensors in {folder} do not fit its config.json: {e}") from None
        return model


def sigmoid_loss_definition(image, text, t, b, image_labels, text_labels):
    """SigLIP's loss as the paper writes it (its Algorithm 1), for L2-normalised embeddings image (n, D) and
    text (m, D), t = exp(t') and b of shape (1,):

        L = -1/n sum_i sum_j log sigmoid(z_ij (t <image_i, text_j> + b))

    z_ij = +1 when image i and text j match, which is when the rows image_labels[i] and text_labels[j]
    are equal, and -1 otherwise. With each caption's index in the batch as its label, (n, 1), only image
    i and caption i match: the paper's diagonal. With the captions' token ids, (n, T), image i also
    matches every caption that is the same text as its own.
    """
    logits = t * image @ text.T + b
    match = torch.ones_like(logits, dtype=torch.bool)
    for image_column, text_column in zip(image_labels.T, text_labels.T):  # rows are equal where all columns are
        match &= image_column[:, None] == text_column[None]
    z = 2 * match.float() - 1  # +1 for a matching pair, -1 for every other
    return -F.logsigmoid(z * logits).sum() / len(image)


def sigmoid_loss(image, text, t, b, text_ids=None, chunk_size=1024, gather=False):
    """sigmoid_loss_definition for the images and captions (B, D) of a batch, in blocks of chunk_size
    captions, and with gather against the captions of every process.

    Image i matches its own caption i and, when text_ids (B, T) is given, every caption whose ids equal
    its own caption's. Those are compared token by token in each block rather than numbered once with
    torch.unique, whose output size depends on the data: it would wait for the device at every step
    and break a compiled graph.

    Each block is checkpointed: backward computes its logits again instead of keeping them, so memory
    grows with B x chunk_size, not with B x captions. Measured on a CPU for 4096 x 4096 pairs (D = 768,
    blocks of 1024), peak memory of forward and backward above inputs and gradients: 121 MiB, against
    134 MiB for a hand-written autograd.Function of the same recomputation and 351 MiB for the whole
    matrix at once; 1.5 s on one thread for this and the Function alike.

    With gather, the sum over j runs over the captions of all processes (gathered with their
    gradients) and B is the local batch, so each process returns world_size times its share of the
    global loss: the mean over processes is the loss of the whole batch on one process, and
    DistributedDataParallel, which averages gradients over processes, gets that loss's gradients.
    Every process must then call it, with the same number of pairs. Without gather the loss is this
    process's batch alone, whether torch.distributed is initialised or not.
    """
    rank, world = 0, 1
    if gather:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("gather=True needs torch.distributed to be initialised (init_process_group)")
        rank, world = dist.get_rank(), dist.get_world_size()
    # A caption's label: its token ids, or else its index in the batch of all processes.
    labels = text_ids
    if labels is None:
        labels = torch.arange(rank * len(text), (rank + 1) * len(text), device=text.device)[:, None]
    image_labels, text_labels = labels, labels
    if world > 1:
        text, text_labels = GatherWithGrad.apply(text), all_gather(labels)
    # In float32 whatever autocast would pick: the logits of a bf16 matmul would round t <x, y> + b.
    with torch.autocast(image.device.type, enabled=False):
        return sum(
            checkpoint(sigmoid_loss_definition, image, text[j : j + chunk_size], t, b, image_labels,
                       text_labels[j : j + chunk_size], use_reentrant=False)
            for j in range(0, len(text), chunk_size)
        )


def all_gather(x):
    """x (n, ...) of every process, concatenated in the order of their ranks: (world_size * n, ...)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class GatherWithGrad(torch.autograd.Function):
    """all_gather that passes gradients back: every process's loss depends on the captions of every
    process, so the gradient reaching a process's captions is the sum over all processes of the
    gradient of their losses with respect to them."""

    @staticmethod
    def forward(ctx, x):
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


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


# Our parameter names -> Hugging Face's, applied in order to a name such as vision.blocks.0.attn.q_proj.weight.
HF_NAMES = [
    ("vision_head.", "vision_model.head."), ("vision.", "vision_model."), ("text.", "text_model."), ("patch_embed", "embeddings.patch_embedding"),
    ("pos_embed", "embeddings.position_embedding"), ("tok_embed", "embeddings.token_embedding"),
    ("blocks.", "encoder.layers."), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.", "self_attn."),
    ("post_norm", "post_layernorm"), ("final_norm", "final_layer_norm"), ("head.norm", "head.layernorm"),
    ("head.in_proj.", "head.attention.in_proj_"), ("head.out_proj", "head.attention.out_proj"),
]
# transformers' defaults, which config.json files written by older versions leave out.
HF_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6, projection_size=None)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6, vision_use_head=True)


def to_hf_name(name):
    for ours, theirs in HF_NAMES:
        name = name.replace(ours, theirs)
    return name


def config_from_hf(folder):
    """Config from the config.json of a Hugging Face SiglipModel checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass the folder of a Hugging Face SigLIP checkpoint")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    architectures = hf.get("architectures") or []
    if not set(architectures) & set(HF_ARCHITECTURES):
        raise ValueError(
            f"{folder} holds a {' / '.join(architectures) or hf.get('model_type', 'unknown')} checkpoint; "
            f"siglip.py loads {', '.join(HF_ARCHITECTURES)}"
        )
    text = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    vision = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    sizes = {}
    for key in ("image_size", "patch_size"):
        value = vision[key]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"{folder}: only square images and patches are supported, got {key} {value}")
            value = value[0]
        sizes[key] = value
    problems = []
    if {text["hidden_act"], vision["hidden_act"]} != {"gelu_pytorch_tanh"}:
        problems.append(f"activations {text['hidden_act']} / {vision['hidden_act']} (only gelu_pytorch_tanh)")
    if vision["num_channels"] != 3:
        problems.append(f"{vision['num_channels']} image channels (only 3)")
    if not vision["vision_use_head"]:
        problems.append("a vision tower without its pooling head")
    if (text["projection_size"] or text["hidden_size"]) != vision["hidden_size"]:
        problems.append("a text projection whose width differs from the vision width")
    if text["layer_norm_eps"] != vision["layer_norm_eps"]:
        problems.append("different layer-norm eps in the two towers")
    if problems:
        raise ValueError(f"{folder}: siglip.py does not support {'; '.join(problems)}")
    return Config(
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        vision_dim=vision["hidden_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_heads=vision["num_attention_heads"],
        vision_mlp_dim=vision["intermediate_size"],
        vocab_size=text["vocab_size"],
        max_seq_len=text["max_position_embeddings"],
        text_dim=text["hidden_size"],
        text_layers=text["num_hidden_layers"],
        text_heads=text["num_attention_heads"],
        text_mlp_dim=text["intermediate_size"],
        norm_eps=text["layer_norm_eps"],
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
    # Pictures of coloured shapes, captions as UTF-8 bytes (256 is padding), a tiny model trained for a
    # few seconds, then zero-shot classification of new pictures. One thread: matrices this small gain
    # nothing from a second, which only waits when the cores are busy.
    from PIL import ImageDraw

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
    shapes = ("circle", "square", "triangle")
    labels = [f"{colour} {shape}" for colour in colours for shape in shapes]

    def draw(label):
        colour, shape = label.split()
        image = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(200, 256, 3)))
        r, cx, cy = rng.integers(9, 15), rng.integers(20, 29), rng.integers(20, 29)
        fill = tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for v in colours[colour])
        draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill)
        return image

    def caption_ids(texts, length):
        return torch.tensor([list(t.encode()) + [256] * (length - len(t.encode())) for t in texts])

    config = Config(image_size=16, patch_size=4, vocab_size=257, max_seq_len=16)
    model = Model(config)
    pool = [labels[i % len(labels)] for i in range(720)]
    images, ids = preprocess([draw(label) for label in pool], config.image_size), caption_ids(pool, config.max_seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.0)
    start = time.perf_counter()
    for step in range(300):
        for group in optimizer.param_groups:  # warmup, then cosine decay: a calm end for a short run
            group["lr"] = 3e-3 * min(1, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / 300))
        pick = torch.randint(len(pool), (32,))
        _, loss = model(images[pick], ids[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 299:
            m = model.metrics()
            print(f"step {step:3d}  loss {loss.item():6.3f}  t {m['t']:5.2f}  b {m['b']:6.2f}  gap {m['gap']:5.2f}")
    print(f"{model.num_params():,} parameters, trained in {time.perf_counter() - start:.1f} s")

    truth = [labels[i] for i in rng.permutation(len(labels))[:5]]
    probs = model.classify(preprocess([draw(label) for label in truth], config.image_size),
                           caption_ids(labels, config.max_seq_len))
    for label, row in zip(truth, probs):
        best = row.argsort(descending=True)[:3]
        print(f"a new {label:15s} -> " + ", ".join(f"{labels[i]} {row[i]:.2f}" for i in best))
    test = [labels[i % len(labels)] for i in range(90)]
    probs = model.classify(preprocess([draw(label) for label in test], config.image_size),
                           caption_ids(labels, config.max_seq_len))
    accuracy = (probs.argmax(-1) == torch.arange(90) % len(labels)).float().mean()
    print(f"zero-shot accuracy on 90 new pictures: {accuracy:.0%} (chance {1 / len(labels):.0%})")
