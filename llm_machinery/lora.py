"""
LoRA: fine-tune a model through low-rank adapters on its linear layers, its own weights frozen (Hu et
al. 2021, https://arxiv.org/abs/2106.09685).

A linear layer y = x W^T + b gains a path through rank r, and only that path learns:
    y = x W^T + b + (alpha / r) * (x A^T) B^T
    x (..., in)   W (out, in)   A (r, in)   B (out, r)
A starts as nn.Linear's own weights do (Kaiming-uniform with a = sqrt(5): uniform in ±1/sqrt(in)) and
B at zero, so training starts from the model as it was; alpha / r keeps the size of the update from
depending on r. Only A and B get gradients and AdamW's two moments: full fine-tuning of a 1B model in
float32 holds 16 bytes a weight (the weight, its gradient, two moments), LoRA the frozen weights (4
bytes each, 2 in bf16) and a few percent of that for the adapters. The frozen weights keep the dtype
they were loaded in (bf16 stays bf16); the adapters are float32, and so is their arithmetic.

wrap() swaps nn.Linear modules of any model for Adapted ones, found by their names; the model file
knows nothing of it. By default every nn.Linear inside the model's stack of blocks (an nn.ModuleList)
is adapted: attention and MLP projections (gpt_llama's wq, wk, wv, wo and w1, w2, w3), not the output
head nor anything outside the blocks. moe.py's routed experts are stacked 3-D parameters, not
nn.Linear modules: they stay frozen, and LoRA adapts its attention, its shared experts and their gate.

After training, merge() gives the model back as its model file builds it, W + (alpha / r) B A in
float32 (one new tensor per weight, the only copy saving needs), which sample.py and any loader of the
model file read unchanged. adapter_state() and
adapter_config() are the adapters alone as peft saves them (adapter_model.safetensors with keys
base_model.model.<Hugging Face module name>.lora_A.weight, and adapter_config.json), so that
peft.PeftModel.from_pretrained puts them on the transformers model; runs.py writes and checks the files.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Adapted(nn.Module):
    """A frozen nn.Linear, base, plus (alpha / r) B A."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.enabled = True  # off: the layer is its base alone, the model as it was loaded (disabled())
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        # The scale goes on the rank-r activations, r numbers a position instead of out. Adding in place
        # into the base's output spares a tensor of its size (a bf16 output rounds the float32 sum once).
        return y.add_(F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scaling, self.lora_B))


@contextlib.contextmanager
def disabled(model):
    """Within it, model computes without its adapters: the frozen model it started from, with no copy
    of its weights (the reference of preference tuning, preferences.py)."""
    found = adapters(model).values()
    for m in found:
        m.enabled = False
    try:
        yield model
    finally:
        for m in found:
            m.enabled = True


def candidates(model):
    """{name: module} of the nn.Linear modules that sit in a stack of blocks (inside an nn.ModuleList)."""
    found = {}
    for list_name, modules in model.named_modules():
        if isinstance(modules, nn.ModuleList):
            for name, module in modules.named_modules(prefix=list_name):
                if isinstance(module, nn.Linear):
                    found[name] = module
    return found


def wrap(model, r, alpha=None, targets=None):
    """Freeze model and adapt, in place, the linear layers of its blocks whose names (the last part,
    such as wq) are in targets, or all of them; alpha defaults to 2 r. The names of those adapted.

    ValueError, in one sentence, for a rank or alpha out of range, a model with no linear layer in
    blocks, or a target no such layer is called."""
    alpha = 2 * r if alpha is None else alpha
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"the LoRA rank must be a positive integer such as 16, not {r!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < math.inf):
        raise ValueError(f"LoRA's alpha must be a positive number such as {2 * r}, not {alpha!r}")
    if adapters(model):
        raise ValueError("the model already carries LoRA adapters")
    found = candidates(model)
    if not found:
        raise ValueError(f"{type(model).__module__}'s model has no linear layer in a stack of blocks for LoRA to adapt")
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in found))
    unknown = [t for t in targets or () if t not in kinds]
    if unknown:
        raise ValueError(f"the blocks of {type(model).__module__}'s model have no linear layer called "
                         f"{', '.join(unknown)}; LoRA can adapt {', '.join(kinds)}")
    model.requires_grad_(False)
    chosen = [name for name in found if targets is None or name.rsplit(".", 1)[-1] in targets]
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, Adapted(found[name], r, alpha))
    return chosen


def adapters(model):
    """{name: Adapted module} of model, in the order of its modules."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapted)}


def describe(model):
    """One line: the rank, the layers adapted and the share of the parameters that train."""
    found = adapters(model)
    some = next(iter(found.values()))
    kinds = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in found))
    trained = sum(m.lora_A.numel() + m.lora_B.numel() for m in found.values())
    frozen = sum(p.numel() for p in model.parameters()) - trained
    dtype = str(some.base.weight.dtype).removeprefix("torch.")
    return (f"LoRA rank {some.r}, alpha {some.alpha:g}, on {len(found)} layers ({kinds}): {trained:,} parameters "
            f"train, {100 * trained / frozen:.2f}% of the {frozen:,} frozen ones in {dtype}")


# ------------------------------------------------------------------------------------ merging


@torch.no_grad()
def merged_state_dict(model):
    """The state dict of the model without its adapters, under its model file's names, in float32:
    each adapted weight W + (alpha / r) B A. Tensors that the model shares between names (tied
    embeddings) are one tensor here too."""
    cast = {}  # id of a tensor -> its float32 copy, so that a shared tensor is cast once

    def as_float(t):
        if id(t) not in cast:
            cast[id(t)] = t.detach().float() if t.is_floating_point() else t.detach()
        return cast[id(t)]

    found = adapters(model)
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if owner.endswith(".base") and owner.removesuffix(".base") in found:
            adapted = owner.removesuffix(".base")
            if leaf == "weight":
                m = found[adapted]  # W + scaling * B A, into one new tensor: no temporaries of W's size
                merged = tensor.to(torch.float32, copy=True)
                state[f"{adapted}.weight"] = merged.addmm_(m.lora_B, m.lora_A, alpha=m.scaling)
            else:
                state[f"{adapted}.{leaf}"] = as_float(tensor)
        else:
            state[name] = as_float(tensor)
    return state


def merge(model):
    """A new model of model's class without adapters, its weights merged (merged_state_dict), built
    from model.config as the model files build theirs; float32 tensors that the merge leaves as they
    are, it shares with model."""
    with torch.device("meta"):  # no memory, no random initialisation: every tensor comes from model
        plain = type(model)(model.config)
    state = merged_state_dict(model)
    plain.load_state_dict(state, assign=True)
    # What assign cannot carry over: buffers kept out of the state dict (RoPE tables), and ties
    # between parameters (assign made each name a Parameter of its own).
    for name, buffer in model.named_buffers():
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffer
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if id(p) in first:
            setattr(plain.get_submodule(owner), leaf, plain.get_parameter(first[id(p)]))
        first.setdefault(id(p), name)
    return plain.train(model.training)


# ------------------------------------------------------------------------------------ peft's layout


def peft_name(name, to_hf_name=None):
    """peft's module name of the layer called name in our model: base_model.model. and its Hugging
    Face name (by to_hf_name, the model file's renaming of parameters), else ours."""
    if to_hf_name is not None:
        name = to_hf_name(f"{name}.weight").removesuffix(".weight")
    return f"base_model.model.{name}"


def adapter_state(model, to_hf_name=None):
    """The adapters as peft saves them: {peft_name(layer).lora_A.weight: A, ....lora_B.weight: B}."""
    state = {}
    for name, m in adapters(model).items():
        key = peft_name(name, to_hf_name)
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = m.lora_A.detach(), m.lora_B.detach()
    return state


def load_adapter_state(model, state, to_hf_name=None):
    """Copy the adapters in state (as adapter_state gives them) into model, which must carry the same
    ones; ValueError if it does not."""
    found = adapters(model)
    expected = {}
    for name, m in found.items():
        key = peft_name(name, to_hf_name)
        expected[f"{key}.lora_A.weight"], expected[f"{key}.lora_B.weight"] = m.lora_A, m.lora_B
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"the adapters do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, p in expected.items():
            if state[key].shape != p.shape:
                raise ValueError(f"the adapter {key} is {tuple(state[key].shape)}, the model's {tuple(p.shape)}")
            p.copy_(state[key])


def adapter_config(model, to_hf_name=None, base=None, task_type=None):
    """adapter_config.json's fields for peft's LoraConfig: the rank, alpha and the layers' names."""
    found = adapters(model)
    some = next(iter(found.values()))
    names = dict.fromkeys(peft_name(name, to_hf_name).rsplit(".", 1)[-1] for name in found)
    alpha = int(some.alpha) if float(some.alpha).is_integer() else some.alpha
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": some.r,
        "lora_alpha": alpha, "target_modules": sorted(names), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
    }
