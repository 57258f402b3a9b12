"""What the benchmarks share: the best of several turns, contenders taking turns, and their setup.

On shared cores noise only ever slows a run down, so the best time of each contender is the one
closest to what the code costs, and taking turns spreads any slow spell over all of them.
"""

import time


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_times(contenders, repeats, setup=lambda: None):
    """Best wall time of each function, calling them in turn after one warm-up call each; setup runs
    untimed before every round."""
    setup()
    for fn in contenders:
        fn()
    best = [float("inf")] * len(contenders)
    for _ in range(repeats):
        setup()
        for i, fn in enumerate(contenders):
            best[i] = min(best[i], timed(fn))
    return best


def quiet_transformers():
    """transformers, imported late (after --threads is set) and without its warnings and progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def chosen_shapes(parser, text, all_shapes):
    """The names in the comma-separated text, each a key of all_shapes, else parser's error."""
    names = text.split(",")
    unknown = set(names) - set(all_shapes)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(all_shapes)}")
    return names


def adamw(params, lr):
    """torch's AdamW, fused where this torch and device have it, as train.py makes it."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr)
