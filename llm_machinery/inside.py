"""
See inside a model (`sample.py --show`): what each attention head looks at, how sure the model is of each
next token, what each layer would already predict (the logit lens), where a mixture of experts sends each
token, where SigLIP's pooling head looks and which patches PaliGemma read for each word of its answer.

The numbers come from the model's own forward, never from a second copy of it. Two ways in, both opt-in
and free when off:
- Attention: while record() runs, torch.nn.functional.scaled_dot_product_attention, which every model
  file calls, is swapped for a function that calls it unchanged and also computes its weights,
  softmax(q k^T * scale) under the same mask, causal flag and grouped-query sharing. Whichever module is
  running at that moment (forward hooks keep track) names the map. A model file dropped beside train.py
  is thus seen without a change to it. Observing the call, rather than asking each file to return its
  weights, keeps the files' fast path (a fused kernel that never forms the weights) as it is, and
  torch.compile's graphs with it.
- What no scaled_dot_product_attention call computes: the residual stream after each block (forward
  hooks on model.layers), a router's choice (the output of each module named `router`, moe.py's
  logits, scores, indices and weights) and an attention-pooling head's weights (siglip.py's MAPHead
  offers them as its method pooling_weights, which its forward pools with).

Every array drawn is saved beside the pictures in numbers.npz (README: "See inside a model").
"""

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from llm_machinery.corpus import UserError

MAX_TOKENS = 64  # beyond this, a head's map has cells and labels too small to read
TOP = 5  # alternatives shown for each next token


def sdpa_weights(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The weights (..., H, L, S) that F.scaled_dot_product_attention gives the values, in float32."""
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)  # key head j serves H // K query heads
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q.float() @ k.float().transpose(-2, -1) * scale
    L, S = scores.shape[-2:]
    if is_causal:  # torch's causal mask is aligned at the top left: query i sees keys 0..i
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1)


class Recording:
    """What one forward showed. attention and pooling: {module name: weights}, in call order;
    residual: the stream after each of model.layers; routes: {router name: (indices, weights, n_experts)}."""

    def __init__(self):
        self.attention, self.pooling, self.residual, self.routes = {}, {}, [], {}


@contextmanager
def record(model):
    """Yield a Recording that fills while the model runs forward inside the with-block."""
    rec, running, handles = Recording(), [], []
    sdpa = F.scaled_dot_product_attention

    def observed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        name = running[-1] if running else "attention"
        rec.attention[name if name not in rec.attention else f"{name}.{len(rec.attention)}"] = sdpa_weights(
            query, key, attn_mask, is_causal, scale, enable_gqa).detach().cpu()
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    def enter(name):
        return lambda module, args: running.append(name)

    def leave(module, args, output):
        running.pop()

    def pooled(name):
        def hook(module, args, output):
            rec.pooling[name] = module.pooling_weights(args[0]).detach().float().cpu()
        return hook

    def routed(name):
        def hook(module, args, output):
            _, scores, indices, weights = output
            rec.routes[name] = (indices.cpu(), weights.detach().float().cpu(), scores.size(-1))
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
        if callable(getattr(module, "pooling_weights", None)):
            handles.append(module.register_forward_hook(pooled(name)))
        if name.rsplit(".", 1)[-1] == "router":
            handles.append(module.register_forward_hook(routed(name)))
    for layer in getattr(model, "layers", ()):
        handles.append(layer.register_forward_hook(lambda m, a, out: rec.residual.append(out.detach())))
    F.scaled_dot_product_attention = observed
    try:
        yield rec
    finally:
        F.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()


def token_text(tokenizer, ids):
    """Each token as text for a label: spaces as middle dots, newlines as \\n and other control characters
    as \\xNN, so that none is invisible."""
    out = []
    for t in ids:
        s = tokenizer.decode_bytes([int(t)]).decode("utf-8", errors="replace")
        s = s.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t")
        out.append("".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s) or "\u2205")
    return out


def check_length(tokenizer, ids, what="the prompt"):
    if len(ids) > MAX_TOKENS:
        cut = tokenizer.decode(ids[:MAX_TOKENS])
        raise UserError(f"{what} is {len(ids)} tokens long and --show draws at most {MAX_TOKENS}, beyond which a "
                        f"head's labels cannot be read; shorten it (its first {MAX_TOKENS} tokens end at "
                        f"{cut[-30:]!r})")


def attention_arrays(rec):
    if not rec.attention and not rec.pooling:
        raise UserError("this model computes no attention that --show can see: it never calls "
                        "torch.nn.functional.scaled_dot_product_attention")
    out = {f"attention.{name}": w.numpy() for name, w in rec.attention.items()}
    out.update({f"pooling.{name}": w.numpy() for name, w in rec.pooling.items()})
    return out


@torch.no_grad()
def look_at_text(model, tokenizer, ids):
    """The numbers of a causal language model over the token ids of a prompt, as named arrays:
    attention.<module> (1, H, T, T); next_* and top_* for each position's next token; lens_* for the logit
    lens; experts.<router>.* for a mixture of experts."""
    check_length(tokenizer, ids)
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    with record(model) as rec:
        logits = model(idx)[0][0].float()
    out = dict(token_ids=np.array(ids), tokens=np.array(token_text(tokenizer, ids)), **attention_arrays(rec))
    # Position t predicts token t + 1: the probability of the one that came, its surprise in bits, the top 5.
    probs = logits.softmax(dim=-1).cpu()
    came = torch.tensor(ids[1:])
    p = probs[:-1].gather(1, came[:, None])[:, 0]
    top = probs.topk(min(TOP, probs.size(-1)), dim=-1)
    out.update(next_prob=p.numpy(), next_bits=(-p.double().log2()).numpy(), top_ids=top.indices.numpy(),
               top_probs=top.values.numpy(), top_tokens=np.array([token_text(tokenizer, r) for r in top.indices]))
    if rec.residual and hasattr(model, "norm") and hasattr(model, "output"):
        # The logit lens (nostalgebraist 2020): the stream after each block, read out as if it were the last.
        lens = torch.stack([model.output(model.norm(x))[0].float().softmax(dim=-1).cpu() for x in rec.residual])
        best = lens.max(dim=-1)
        out.update(lens_ids=best.indices.numpy(), lens_probs=best.values.numpy(),
                   lens_tokens=np.array([token_text(tokenizer, r) for r in best.indices]),
                   lens_prob_of_next=lens[:, :-1].gather(2, came.expand(len(lens), -1)[..., None])[..., 0].numpy())
    for name, (indices, weights, n_experts) in rec.routes.items():
        counts = torch.bincount(indices.flatten(), minlength=n_experts)
        out.update({f"experts.{name}.indices": indices.numpy(), f"experts.{name}.weights": weights.numpy(),
                    f"experts.{name}.share": (counts.float() / counts.sum()).numpy()})
    return out


@torch.no_grad()
def look_at_images(model, tokenizer, pixels, label_ids, labels):
    """The numbers of an image-text model: probs (I, C), each image's softmax over the captions as
    classify gives it, the attention of both towers and the pooling head's weights over the patches."""
    with record(model) as rec:
        probs = model.classify(pixels, label_ids)
    return dict(probs=probs.float().cpu().numpy(), captions=np.array(labels), images=image_array(pixels),
                **attention_arrays(rec))


@torch.no_grad()
def look_at_answer(model, tokenizer, pixels, prefix, answer):
    """The numbers of a vision-language model that answered answer (ids) to prefix (ids: bos, prompt, "\\n")
    about one image: the decoder run over image, prefix and answer, and for each answer token the
    attention of the position that wrote it: image_attention (layers, answer, H, N) over the patches and
    text_attention (layers, answer, H, T) over the text."""
    ids = list(prefix) + list(answer)
    check_length(tokenizer, ids, "the prompt with its answer")
    N = model.config.n_image_tokens
    idx = torch.tensor([ids], device=pixels.device)
    with record(model) as rec:
        model(pixels, idx, torch.tensor([len(prefix)]))
    out = dict(token_ids=np.array(ids), tokens=np.array(token_text(tokenizer, ids)), prefix_len=np.array(len(prefix)),
               images=image_array(pixels), **attention_arrays(rec))
    # The decoder's layers are the maps whose keys span image and text; the last asks text queries only.
    decoder = [w[0] for w in rec.attention.values() if w.size(-1) == N + len(ids)]
    writers = [len(prefix) - 1 + j for j in range(len(answer))]  # position t writes token t + 1
    rows = [w[:, [N + t - (N + len(ids) - w.size(-2)) for t in writers]].transpose(0, 1) for w in decoder]
    if rows and writers:
        out.update(image_attention=torch.stack([r[..., :N] for r in rows]).numpy(),
                   text_attention=torch.stack([r[..., N:] for r in rows]).numpy())
    return out


def image_array(pixels):
    """(B, S, S, 3) floats in [0, 1] from pixels in [-1, 1], for drawing maps over the images."""
    return ((pixels.float().cpu().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).numpy()


def save_numbers(path, arrays):
    """All arrays into one npz file, written atomically."""
    from llm_machinery.corpus import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)
