"""
Model files and checkpoint folders: what train.py and sample.py both need to find a model, load it and
save it. Generation depends on this file, never on the trainer.

A model file is a .py file beside this one that defines Model, Config and TASK at top level (found
by reading the files, not importing them); its HF_ARCHITECTURES lists the Hugging Face architectures
its Model.from_pretrained loads.

Two kinds of folders hold a model:
    a run folder, written by train.py:
        config.json        {"model": model file, "task": TASK, "config": the Config's fields}
        model.safetensors  float32 weights; metadata {"step", "sha256" of the tensors' content}
        tokenizer files    bpe.py's tokenizer.json + tokenizer.tiktoken, or those copied from --init with
                           its chat template and generation_config.json (the ids that end an answer)
        state.pt           optimizer, step, schedule, RNG and data position, with a sha256 of its content
        metrics.jsonl, loss.png
        with --lora, model.safetensors holds the merged weights, and the adapters alone, which the run
        trains and resumes from, are in peft's layout (lora.py): adapter_model.safetensors (metadata
        as model.safetensors's) and adapter_config.json
    a Hugging Face folder: config.json with "architectures", model.safetensors (or shards and their
        index), tokenizer.json or Llama 3's tokenizer.model, generation_config.json.

Every file is written to a temporary name and moved into place (corpus.atomic_write), and the
checksums are recomputed when a file is read: a flipped byte inside a tensor leaves a file that still
loads, and only its content can tell.
"""

import argparse
import ast
import dataclasses
import hashlib
import importlib
import inspect
import json
import re
import shutil
from pathlib import Path

import torch

from llm_machinery import lora
from llm_machinery.corpus import ENDOFTEXT, UserError, atomic_write, in_one_line

# The project's root: train.py, sample.py and the model files beside them, whether run from a clone
# or installed, where pip puts them all at the top of site-packages beside this package.
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ model files


def model_choices():
    """Files beside train.py that define Model, Config and TASK at top level, found without importing them."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        names = set()
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if {"Model", "Config", "TASK"} <= names:
            found.append(path.stem)
    return found


def import_model(name):
    choices = model_choices()
    if name not in choices:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(choices)}")
    return importlib.import_module(name)


def model_for_architecture(architecture):
    """The name of the model file whose HF_ARCHITECTURES lists architecture, read without importing every file."""
    for name in model_choices():
        for node in ast.parse((ROOT / f"{name}.py").read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HF_ARCHITECTURES" for t in node.targets):
                if architecture in ast.literal_eval(node.value):
                    return name
    raise UserError(f"no model file loads the architecture {architecture}")


# --------------------------------------------------------------------------------------- folders


def read_json(path, advice):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e.strerror if isinstance(e, OSError) else e}); {advice}") from None


def read_folder_config(folder):
    """config.json of a checkpoint folder: train.py's ({"model", "config", ...}) or a Hugging Face one."""
    path = existing(folder) / "config.json"
    saved = read_json(path, "pass a Hugging Face checkpoint folder or one that train.py wrote")
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a model's config; pass a Hugging Face checkpoint folder or one that train.py wrote")
    return saved


def is_run_folder(saved):
    """Whether a folder's config.json (saved) was written by train.py."""
    return isinstance(saved.get("model"), str) and isinstance(saved.get("config"), dict)


def folder_model(folder):
    """The model file of a checkpoint folder: the one train.py wrote it with, or the one that loads its architecture."""
    saved = read_folder_config(folder)
    if is_run_folder(saved):
        return saved["model"]
    architectures = saved.get("architectures") or ["(none)"]
    return model_for_architecture(architectures[0])


def default_out(model, source):
    """out/<model> for the built-in data; out/<model>-<name> for --data, so that a run on other data
    never lands in (and is refused by) the folder of an earlier run."""
    if source is None:
        return Path("out") / model
    if source.startswith(("http://", "https://")):
        name = Path(source.split("?")[0].rstrip("/")).stem or source.split("/")[2]
    else:
        parts = [p for p in Path(source).expanduser().parts if not any(c in p for c in "*?[")]
        name = Path(parts[-1]).stem if parts else "data"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "data"
    return Path("out") / f"{model}-{name}"


def load_folder(folder, module, dtype="float32"):
    """The model in a checkpoint folder, in dtype (float32 or bfloat16): train.py's (config.json and
    model.safetensors, float32, checked against the digest it carries) or a Hugging Face one
    (Model.from_pretrained, which reads a bf16 checkpoint in bf16 without a float32 copy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, safe_open

    folder = Path(folder)
    saved = read_folder_config(folder)
    try:
        if is_run_folder(saved):
            model = module.Model(module.Config(**saved["config"]))
            with safe_open(folder / "model.safetensors", "pt") as f:
                metadata = f.metadata()
            load_model(model, folder / "model.safetensors")
            check_weights(model, folder / "model.safetensors", metadata)
            return model.to(getattr(torch, dtype))
        return module.Model.from_pretrained(folder, **({} if dtype == "float32" else {"dtype": dtype}))
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        raise UserError(f"cannot load the model in {folder} ({type(e).__name__}: {in_one_line(e)}); it may be "
                        "corrupt, incomplete or written by another version of its model file") from None


def existing(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; pass the folder of a run or a checkpoint" if not folder.exists()
                        else f"{folder} is a file; pass the folder that holds it")
    return folder


def load_run(folder):
    """(model, tokenizer, eos_ids) from a folder that train.py wrote: the eos ids of the generation_config.json
    that a fine-tuned run copies from its --init, and <|endoftext|>, which ends each document of a
    corpus streamed as documents (corpus.py), so that a sample ends where a document would."""
    folder = existing(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} holds no config.json; pass a folder written by train.py, or --hf for a Hugging Face one")
    saved = read_folder_config(folder)
    if not is_run_folder(saved):
        raise UserError(f"{folder} was not written by train.py; pass --hf {folder} for a Hugging Face folder")
    model = load_folder(folder, import_model(saved["model"]))
    tokenizer = folder_tokenizer(folder)
    ends = {tokenizer.special_tokens[ENDOFTEXT]} if ENDOFTEXT in tokenizer.special_tokens else set()
    return model, tokenizer, eos_ids(folder, saved) | ends


def load_hf(folder, dtype="float32"):
    """(model, tokenizer, eos_ids) from a Hugging Face checkpoint folder, the weights in dtype."""
    folder = existing(folder)
    config = read_json(folder / "config.json", "pass a Hugging Face checkpoint folder")
    if isinstance(config, dict) and is_run_folder(config):
        raise UserError(f"{folder} was written by train.py, not a Hugging Face folder; drop --hf: sample.py {folder}")
    architectures = config.get("architectures") or ["(none)"]
    module = import_model(model_for_architecture(architectures[0]))
    takes_dtype = "dtype" in inspect.signature(module.Model.from_pretrained).parameters
    if dtype != "float32" and not takes_dtype:
        raise UserError(f"{module.__name__}.py loads its weights in float32 only; leave --dtype out")
    try:
        tokenizer = load_tokenizer(folder)
        model = module.Model.from_pretrained(folder, dtype=dtype) if takes_dtype else module.Model.from_pretrained(folder)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None
    return model, tokenizer, eos_ids(folder, config)


def eos_ids(folder, config):
    """The ids that end an answer: generation_config.json's eos_token_id, else config.json's.

    Instruct models list several there (Llama 3's <|end_of_text|>, <|eom_id|> and <|eot_id|>, Qwen's
    <|im_end|> and <|endoftext|>), and transformers' generate stops at any of them."""
    source = config
    if (folder / "generation_config.json").is_file():
        generation = read_json(folder / "generation_config.json", "fix or remove it")
        if generation.get("eos_token_id") is not None:
            source = generation
    eos = source.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"the eos_token_id {eos!r} in {folder} is neither a token id nor a list of them")
    return frozenset(ids)


def build_config(module, overrides, base=None):
    """module.Config with the fields in overrides: on its defaults, or on the config base."""
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"Config of {module.__name__} has no field {', '.join(unknown)}; its fields: {', '.join(sorted(fields))}")
    try:
        return module.Config(**overrides) if base is None else dataclasses.replace(base, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid config: {e}") from None


def load_init(folder, module, overrides, context=None, dtype="float32"):
    """(model, config, tokenizer) to fine-tune from --init: the folder's weights, in dtype; its config
    with the --set fields changed, and the training context cut to context unless --set gives
    max_seq_len; and its tokenizer as data.py's pipelines take it: (tokenizer, a key of its files'
    content, the files to copy into the run's folder)."""
    if dtype != "float32" and "dtype" not in inspect.signature(module.Model.from_pretrained).parameters:
        raise UserError(f"{module.__name__}.py loads its weights in float32 only; leave --dtype out")
    source = load_folder(folder, module, dtype)
    if context and "max_seq_len" not in overrides:
        overrides = {**overrides, "max_seq_len": min(context, source.config.max_seq_len)}
    config = build_config(module, overrides, base=source.config)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(getattr(torch, dtype))  # a bf16 model is built in bf16, not cast from float32
        model = module.Model(config)
        model.load_state_dict(source.state_dict())
    except ValueError as e:
        raise UserError(f"invalid config: {e}") from None
    except RuntimeError:
        raise UserError(f"--set {', '.join(sorted(overrides))} changes the shape of the weights in {folder}; with "
                        "--init only fields such as max_seq_len and dropout can change") from None
    finally:
        torch.set_default_dtype(default)
    tokenizer = folder_tokenizer(folder)
    if tokenizer.n_vocab > config.vocab_size:
        raise UserError(f"the tokenizer in {folder} has {tokenizer.n_vocab} tokens but the model only {config.vocab_size}; "
                        "the folder's tokenizer is not the model's")
    files, key = tokenizer_files(folder)
    return model, config, (tokenizer, key, files)


# ------------------------------------------------------------------------------------- tokenizers

# What a folder's tokenizer is made of, and what chatting with its model needs besides (chat.py: the chat
# template, the ids that end an answer); a run fine-tuned from a folder copies these into its own.
TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")
CHAT_FILES = ("chat_template.jinja", "generation_config.json")


def load_tokenizer(folder):
    """The tokenizer in folder: what train.py saved (tokenizer.tiktoken beside bpe.py's tokenizer.json),
    else a Hugging Face folder's tokenizer.json, else Llama 3's tokenizer.model (a tiktoken rank file)."""
    import bpe

    folder = Path(folder)
    # train.py's tokenizer.json holds only the pattern and the special tokens; its ranks live in
    # tokenizer.tiktoken, which a Hugging Face folder never has, so that file tells the two apart.
    if (folder / "tokenizer.tiktoken").is_file():
        return bpe.Tokenizer.load(folder)
    if (folder / "tokenizer.json").is_file():
        from llm_machinery import hf_tokenizer

        return hf_tokenizer.load(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        return bpe.Tokenizer.from_llama3(folder / "tokenizer.model")
    raise UserError(f"{folder} holds no tokenizer: neither a tokenizer.json (with tokenizer.tiktoken if "
                    "train.py wrote it) nor Llama 3's tokenizer.model")


def folder_tokenizer(folder):
    """load_tokenizer, with a file that cannot be read said in one sentence."""
    try:
        return load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in {folder} ({in_one_line(e)})") from None


def save_tokenizer(out_dir, tokenizer, files=None):
    """The tokenizer into out_dir, as load_tokenizer reads it: the files of a pretrained one copied, one
    trained here saved by bpe.py."""
    if files is None:
        tokenizer.save(out_dir)
    for path in files or ():
        atomic_write(Path(out_dir) / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))


def tokenizer_files(folder):
    """(the tokenizer and chat files in folder, a key of the tokenizer's content that names its token files in
    the cache)."""
    files = [Path(folder) / name for name in TOKENIZER_FILES + CHAT_FILES if (Path(folder) / name).is_file()]
    key = "init-" + hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files
                                            if f.name in TOKENIZER_FILES)).hexdigest()[:16]
    return files, key


# ------------------------------------------------------------------------------------ checkpoints


def content_digest(obj, h=None):
    """sha256 over a nested structure of dicts, lists, tensors and plain values, in a fixed order."""
    top = h is None
    h = hashlib.sha256() if top else h
    if isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            content_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for item in obj:
            content_digest(item, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else None


def weights_digest(model):
    return content_digest(model.state_dict())


def check_weights(model, path, metadata):
    """Raise ValueError when the weights just loaded from path differ from the digest saved with them."""
    saved = (metadata or {}).get("sha256")
    if saved is not None and saved != weights_digest(model):
        raise ValueError(f"the content of {path} does not match its checksum, so the file was damaged after it was written")


# What a run folder holds besides its tokenizer; --fresh removes these, the training state first.
RUN_FILES = ("state.pt", "model.safetensors", "config.json", "metrics.jsonl", "loss.png", "adapter_model.safetensors",
             "adapter_config.json")


def save_checkpoint(out, model, optimizer, config, name, task, state):
    """model.safetensors, config.json and state.pt, each written to a temp file and moved into place;
    for a model with LoRA adapters, the merged weights and the adapters' files."""
    from safetensors.torch import save_model

    adapted = bool(lora.adapters(model))
    weights = lora.merge(model) if adapted else model
    metadata = {"step": str(state["step"]), "sha256": weights_digest(weights)}
    atomic_write(out / "model.safetensors", lambda tmp: save_model(weights, tmp, metadata=metadata))
    if adapted:
        save_adapters(out, model, name, task, state)
        # Buffers that training changes (moe.py's balancing biases) are no adapters, yet resuming needs them.
        state = {**state, "buffers": {k: v for k, v in model.state_dict().items() if k in dict(model.named_buffers())}}
    # What the model learnt from (the data's fingerprint) goes beside its config, where sample.py reads it.
    fields = {"model": name, "task": task, "config": dataclasses.asdict(config), "data": state["data"]["fingerprint"]}
    config_json = json.dumps(fields, indent=2)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(config_json + "\n"))
    state = {**state, "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    state["sha256"] = content_digest(state)
    atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))


def save_adapters(out, model, name, task, state):
    """adapter_model.safetensors and adapter_config.json as peft writes them, under the Hugging Face
    names of the layers where the model file has to_hf_name; the former's metadata as model.safetensors's."""
    from safetensors.torch import save_file

    to_hf_name = getattr(import_model(name), "to_hf_name", None)
    tensors = lora.adapter_state(model, to_hf_name)
    metadata = {"format": "pt", "step": str(state["step"]), "sha256": content_digest(tensors)}
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
    fields = lora.adapter_config(model, to_hf_name, base=state["run"].get("init"),
                                 task_type="CAUSAL_LM" if task == "causal_lm" else None)
    atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(fields, indent=2) + "\n"))


def load_adapters(path, model, name, metadata):
    """Copy the adapters in path into model; ValueError where they do not fit or not match their checksum."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    if metadata.get("sha256") != content_digest(tensors):
        raise ValueError(f"the content of {path} does not match its checksum, so the file was damaged after it was written")
    lora.load_adapter_state(model, tensors, getattr(import_model(name), "to_hf_name", None))


def read_state(out):
    """The training state in out/state.pt, checked against its own checksum; read without pickle."""
    path = out / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same here
        raise UserError(f"the checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it or pass --fresh") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise UserError(f"{path} is not a training state of train.py; delete it or pass --fresh")
    saved = state.pop("sha256", None)
    if saved is not None and saved != content_digest(state):
        raise UserError(f"the checkpoint {path} is corrupt: its content does not match its checksum; delete it or pass --fresh")
    return state


def load_checkpoint(out, model, config, name, fingerprint, run):
    """The training state in out, after checking it belongs to this run and loading the weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, safe_open

    state = read_state(out)
    mine = dataclasses.asdict(config)
    if state.get("model") != name or state["config"] != mine:
        diff = [f"{k} {state['config'].get(k)} vs {mine[k]}" for k in mine if state["config"].get(k) != mine[k]]
        what = f"model {state.get('model')}" if state.get("model") != name else "a config with " + ", ".join(diff)
        raise UserError(f"{out} holds a checkpoint of {what}; to keep it, use another --out or its settings (--fresh would erase it)")
    if state.get("data") and state["data"].get("fingerprint") != fingerprint:
        raise UserError(f"{out} holds a checkpoint trained on other data or another tokenizer; to keep it, use another --out (--fresh would erase it)")
    # The data order and the meaning of a step depend on these; a run resumed with others would
    # quietly become another run (torchrun on a single-process folder, say).
    saved_run = state.get("run", run)
    if saved_run != run:
        diff = ", ".join(f"{k.replace('_', ' ')} {saved_run.get(k)} (now {run.get(k)})" for k in {**saved_run, **run}
                         if saved_run.get(k) != run.get(k))
        raise UserError(f"{out} holds a run with {diff}; to keep it, use another --out or its settings (--fresh would erase it)")
    # A LoRA run resumes from its adapters, on the frozen weights it was built with, not from the merge.
    adapted = bool(lora.adapters(model))
    path = out / ("adapter_model.safetensors" if adapted else "model.safetensors")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        if adapted:
            load_adapters(path, model, name, metadata)
            for key, buffer in state.get("buffers", {}).items():
                model.get_buffer(key).copy_(buffer)
        else:
            load_model(model, path)
            check_weights(model, path, metadata)
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise UserError(f"the weights {path} are missing, corrupt or truncated ({in_one_line(e)}); delete state.pt or pass --fresh") from None
    if metadata.get("step") != str(state["step"]):
        raise UserError(f"{out} holds weights of step {metadata.get('step')} but a training state of step {state['step']}; delete state.pt or pass --fresh")
    return state


def trim_metrics(path, step):
    """Drop records after step (written by a run that died after its last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


# ------------------------------------------------------------------------------- devices and flags


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but torch sees no Apple GPU")
    return device


# Dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
]


def peak_flops(device):
    """Dense bf16 FLOP/s of one device, for MFU; None where unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    return None


class HelpFormatter(argparse.HelpFormatter):
    """Shows each default once: where the help text does not already say it, and not for None or off."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return f"{action.help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are UserError: one sentence and exit code 2 through main(), like
    every other bad input, instead of a usage block and SystemExit from inside parse_args. A flag's
    type that refuses a value says "must be ...", which reads "--lr must be ..."."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            raise UserError(self.unknown_flags(unknown.group(1).split()))
        raise UserError(re.sub(r"^argument ([^:]+): must ", r"\1 must ", message))

    def unknown_flags(self, words):
        """"unknown flag --time_budget (did you mean --time-budget?)", with the nearest flag by spelling; the
        words after an unknown flag are its values, and are named only when no flag is unknown."""
        import difflib

        known = [f for f in self._option_string_actions if f.startswith("--")]
        said = []
        for word in (w.split("=")[0] for w in words if w.startswith("-")):
            near = difflib.get_close_matches(word.replace("_", "-").lower(), known, n=1, cutoff=0.6)
            said.append(f"{word} (did you mean {near[0]}?)" if near else word)
        what = f"unknown flag{'s' if len(said) > 1 else ''} {', '.join(said)}" if said else \
            f"unexpected argument{'s' if len(words) > 1 else ''} {' '.join(words)}"
        return f"{what}; python {self.prog} --help lists every flag"
