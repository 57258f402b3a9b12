"""
The pictures of `sample.py --show`, drawn with matplotlib from the named arrays inside.py records (the
same arrays numbers.npz holds). Each function writes PNG files into a folder and returns their paths.
"""

import math
import textwrap

import numpy as np

from llm_machinery.corpus import UserError

DPI = 100
LABEL = 6.5  # points: a token label; a token's cell is at least this tall, so 64 labels fit a head's map
CELL = LABEL * 1.25 / 72  # inches per token in an attention map


def require_matplotlib():
    """matplotlib's pyplot on the file-only Agg backend, or one sentence that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--show draws with matplotlib, which is not installed; pip install -e ".[plots]"') from None
    return plt


def save(fig, folder, name, paths):
    path = folder / name
    fig.savefig(path, dpi=DPI)
    require_matplotlib().close(fig)
    paths.append(path)


def head_grid(n):
    """(rows, columns) of n panels, at most 8 a row."""
    cols = min(n, 8, max(1, math.ceil(math.sqrt(n))) if n <= 16 else 8)
    return math.ceil(n / cols), cols


def attention_layers(arrays, tokens, folder, paths, title):
    """One picture per layer: every head's map of query tokens (rows) over key tokens (columns).

    The heads are tiled into one image with gaps, drawn by one imshow: a subplot per head took 30 s a
    layer at 32 heads of 64 tokens, the mosaic a few seconds. The token labels run along the left and the
    bottom edges, one set per row and per column of heads."""
    plt = require_matplotlib()
    from matplotlib.colors import PowerNorm

    maps = [(name.removeprefix("attention."), w[0]) for name, w in arrays.items() if name.startswith("attention.")]
    gap = 3  # cells between two heads
    for i, (name, w) in enumerate(maps):
        H, L, S = w.shape
        rows, cols = head_grid(H)
        mosaic = np.full((rows * (L + gap) - gap, cols * (S + gap) - gap), np.nan, dtype=np.float32)
        for h in range(H):
            r, c = divmod(h, cols)
            mosaic[r * (L + gap) : r * (L + gap) + L, c * (S + gap) : c * (S + gap) + S] = w[h]
        inch = CELL * max(1.0, 20 / max(L, S))  # a few tokens still make a map of readable size
        left, bottom, top, right = 1.1, 1.1, 0.7, 1.3
        width, height = mosaic.shape[1] * inch, mosaic.shape[0] * inch
        fig = plt.figure(figsize=(width + left + right, height + bottom + top))
        W, Hf = fig.get_size_inches()
        ax = fig.add_axes((left / W, bottom / Hf, width / W, height / Hf))
        cmap = plt.get_cmap("Blues").with_extremes(bad="white")
        # A square-root scale, so that a diffuse head's small weights show beside a sharp head's large ones.
        image = ax.imshow(mosaic, cmap=cmap, norm=PowerNorm(0.5, 0, 1), interpolation="nearest", aspect="auto")
        ax.set_xticks([c * (S + gap) + j for c in range(cols) for j in range(S)])
        ax.set_xticklabels(tokens[:S] * cols, rotation=90, fontsize=LABEL)
        ax.set_yticks([r * (L + gap) + j for r in range(rows) for j in range(L)])
        ax.set_yticklabels(tokens[S - L : S] * rows, fontsize=LABEL)
        ax.tick_params(length=0, pad=1)
        for spine in ax.spines.values():
            spine.set_visible(False)
        for h in range(H):
            r, c = divmod(h, cols)
            ax.text(c * (S + gap) + S / 2, r * (L + gap) - 0.7, f"head {h}", ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"{title}: attention of layer {i} ({name}); row: the token that asks, column: the token it "
                     "looks at", fontsize=10, y=1 - 0.15 / Hf)
        bar = fig.add_axes(((left + width + 0.25) / W, bottom / Hf, 0.15 / W, min(height, 4) / Hf))
        fig.colorbar(image, cax=bar, label="attention weight (each row sums to 1; square-root scale)")
        save(fig, folder, f"attention_layer{i:02d}.png", paths)


def next_tokens(arrays, folder, paths, title):
    """For each position, how surprised the model was by the token that came (bits), its probability and the
    five tokens it found likeliest."""
    plt = require_matplotlib()
    tokens, bits, p = arrays["tokens"], arrays["next_bits"], arrays["next_prob"]
    n = len(bits)
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.2 * n))
    y = np.arange(n)
    bars = ax.barh(y, bits, color=plt.cm.RdYlGn(p), height=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{tokens[t]}  \u2192  {tokens[t + 1]}" for t in range(n)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("loss of the token that came, in bits (-log2 p); bar colour: p, red 0 to green 1")
    ax.set_xlim(0, max(1.0, float(bits.max())) * 2.6)
    for t, bar in enumerate(bars):
        alternatives = "  ".join(f"{tok} {q:.2f}" for tok, q in zip(arrays["top_tokens"][t], arrays["top_probs"][t]))
        ax.text(bar.get_width() + 0.05 * ax.get_xlim()[1] / 2.6, t, f"p={p[t]:.2f}   top 5: {alternatives}",
                va="center", fontsize=6.5)
    ax.set_title(f"{title}: each next token, the probability the model gave it and the 5 it found likeliest\n"
                 f"mean {bits.mean():.2f} bits per token", fontsize=10)
    fig.tight_layout()
    save(fig, folder, "next_token.png", paths)


def logit_lens(arrays, folder, paths, title):
    """The token each layer's residual stream would predict at each position, and its probability."""
    plt = require_matplotlib()
    probs, words, tokens = arrays["lens_probs"], arrays["lens_tokens"], arrays["tokens"]
    L, T = probs.shape
    fig, ax = plt.subplots(figsize=(2.2 + 0.62 * T, 2.2 + 0.42 * L))
    image = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for layer in range(L):
        for t in range(T):
            word = words[layer, t]
            ax.text(t, layer, word if len(word) <= 7 else word[:6] + "\u2026", ha="center", va="center",
                    fontsize=6.5, color="white" if probs[layer, t] < 0.6 else "black")
    ax.set_xticks(range(T))
    ax.set_xticklabels(tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"after layer {i}" for i in range(L)], fontsize=7)
    ax.set_xlabel("input token (each column predicts the token after it)")
    ax.set_title(f"{title}: logit lens, the likeliest next token read from the residual stream after each layer "
                 "through the final norm and the output head", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the token shown")
    fig.tight_layout()
    save(fig, folder, "logit_lens.png", paths)


def experts(arrays, folder, paths, title):
    """Per MoE layer: the weight of each expert for each token (blank: not chosen), each expert's share."""
    plt = require_matplotlib()
    routers = [name.removesuffix(".indices") for name in arrays if name.startswith("experts.")
               and name.endswith(".indices")]
    if not routers:
        return
    tokens = arrays["tokens"]
    E, T = len(arrays[f"{routers[0]}.share"]), len(tokens)
    fig, axes = plt.subplots(len(routers), 1, figsize=(3.5 + 0.24 * T, 1.2 + len(routers) * (1.4 + 0.2 * E)),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes[:, 0], routers):
        weights = np.full((E, T), np.nan)
        for t in range(T):
            weights[arrays[f"{name}.indices"][t], t] = arrays[f"{name}.weights"][t]
        image = ax.imshow(weights, cmap="YlOrRd", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        share = arrays[f"{name}.share"]
        ax.set_yticks(range(E))
        ax.set_yticklabels([f"expert {e}: {100 * s:.0f}%" for e, s in enumerate(share)], fontsize=7)
        ax.set_xticks(range(T))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        ax.set_title(f"router {name.removeprefix('experts.')}", fontsize=8)
    fig.suptitle(f"{title}: which experts each token goes to, with their mixing weights (blank: not chosen);\n"
                 "beside each expert, its share of the token-expert assignments", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="router weight")
    save(fig, folder, "experts.png", paths)


def draw_text(arrays, folder, title):
    """The pictures of a causal language model; returns their paths."""
    paths = []
    tokens = [str(t) for t in arrays["tokens"]]
    attention_layers(arrays, tokens, folder, paths, title)
    next_tokens(arrays, folder, paths, title)
    if "lens_probs" in arrays:
        logit_lens(arrays, folder, paths, title)
    experts(arrays, folder, paths, title)
    return paths


def over_image(ax, image, weights, vmax):
    """weights (n * n,) of the patches, as a translucent heat map over image (S, S, 3)."""
    n = math.isqrt(len(weights))
    ax.imshow(image, interpolation="nearest")
    S = image.shape[0]
    shown = ax.imshow(weights.reshape(n, n), cmap="inferno", alpha=0.5, vmin=0, vmax=vmax, extent=(0, S, S, 0),
                      interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def draw_images(arrays, names, folder, title):
    """The pictures of an image-text model: the image x caption probabilities, and the pooling head's
    weights over each image's patches, per head and averaged."""
    plt = require_matplotlib()
    paths, probs, captions = [], arrays["probs"], [str(c) for c in arrays["captions"]]
    I, C = probs.shape
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * C, 1.8 + 0.45 * I))
    image = ax.imshow(probs, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for i in range(I):
        for c in range(C):
            ax.text(c, i, f"{probs[i, c]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if probs[i, c] > 0.6 else "black")
    ax.set_xticks(range(C))
    ax.set_xticklabels([textwrap.fill(c, 16) for c in captions], fontsize=7)
    ax.set_yticks(range(I))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_title(f"{title}: probability of each caption for each image (softmax over the captions)", fontsize=9)
    fig.colorbar(image, ax=ax, label="probability")
    fig.tight_layout()
    save(fig, folder, "captions.png", paths)
    for name, w in ((k, v) for k, v in arrays.items() if k.startswith("pooling.")):
        H = w.shape[1]
        fig, axes = plt.subplots(I, H + 2, figsize=(1.7 * (H + 2) + 1, 1.8 * I + 0.9), squeeze=False)
        vmax = float(w.max())
        for i in range(I):
            axes[i, 0].imshow(arrays["images"][i], interpolation="nearest")
            axes[i, 0].set_xticks([])
            axes[i, 0].set_yticks([])
            axes[i, 0].set_ylabel(textwrap.fill(names[i], 18), fontsize=7)
            for h in range(H):
                shown = over_image(axes[i, h + 1], arrays["images"][i], w[i, h], vmax)
            over_image(axes[i, H + 1], arrays["images"][i], w[i].mean(0), vmax)
        for h in range(H):
            axes[0, h + 1].set_title(f"head {h}", fontsize=8)
        axes[0, 0].set_title("image", fontsize=8)
        axes[0, H + 1].set_title("mean of the heads", fontsize=8)
        fig.suptitle(f"{title}: where the pooling head's probe looks ({name.removeprefix('pooling.')}): its "
                     "attention over the patches", fontsize=9)
        fig.colorbar(shown, ax=axes, shrink=0.6, label="attention weight (each head sums to 1 over the patches)")
        save(fig, folder, "pooling.png", paths)
    return paths


def draw_answer(arrays, name, folder, title):
    """The pictures of a vision-language model's answer: for each answer token, the attention of the
    position that wrote it over the image (per layer and averaged, mean of the heads) and over the text."""
    plt = require_matplotlib()
    paths, tokens, P = [], [str(t) for t in arrays["tokens"]], int(arrays["prefix_len"])
    if "image_attention" not in arrays:
        return paths
    image_w = arrays["image_attention"].mean(axis=2)  # (layers, answer, N), mean over heads
    L, A, _ = image_w.shape
    answer = tokens[P:]
    fig, axes = plt.subplots(A, L + 1, figsize=(max(1.8 * (L + 1) + 1.8, 6.5), 1.9 * A + 1.0), squeeze=False,
                             layout="constrained")
    vmax = float(image_w.max())
    for a in range(A):
        for layer in range(L + 1):
            w = image_w[layer, a] if layer < L else image_w[:, a].mean(0)
            shown = over_image(axes[a, layer], arrays["images"][0], w, vmax)
            axes[a, layer].set_xlabel(f"{w.sum():.0%} on the image", fontsize=6.5, labelpad=1)
        axes[a, 0].set_ylabel(f"writing {answer[a]!r}", fontsize=8)
    for layer in range(L):
        axes[0, layer].set_title(f"layer {layer}", fontsize=8)
    axes[0, L].set_title("mean of the layers", fontsize=8)
    fig.suptitle(f"{title} on {name}: where the model looked in the image\nwhile writing each token of its answer "
                 "(mean of the heads)", fontsize=9)
    fig.colorbar(shown, ax=axes, shrink=0.6, label="attention weight on the patch")
    save(fig, folder, "answer_image.png", paths)
    text_w = arrays["text_attention"].mean(axis=2)  # (layers, answer, T)
    T = text_w.shape[-1]
    fig, axes = plt.subplots(1, L, figsize=(L * (1.2 + 0.3 * T) + 1.5, 2.2 + 0.3 * A), squeeze=False,
                             layout="constrained")
    for layer, ax in enumerate(axes[0]):
        shown = ax.imshow(text_w[layer], cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(T))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(A))
        ax.set_yticklabels([f"writing {t}" for t in answer] if layer == 0 else [], fontsize=7)
        ax.axvline(P - 0.5, color="grey", lw=0.8)
        ax.set_title(f"layer {layer}", fontsize=8)
    fig.suptitle(f"{title}: attention of the position that wrote each answer token over the text (prefix | "
                 "answer), mean of the heads", fontsize=9)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="attention weight")
    save(fig, folder, "answer_text.png", paths)
    return paths
