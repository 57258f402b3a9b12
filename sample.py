"""
Stream text from a model trained by train.py, or from a Hugging Face checkpoint folder; rank captions
for images with an image-text model; answer prompts about images with a vision-language model.

    python sample.py out/gpt_llama --prompt "The"        # a folder written by train.py
    python sample.py out/gpt_llama                       # interactive: one prompt per line until EOF
    python sample.py --hf path/to/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python sample.py out/siglip --image a.png b.png --labels "a red circle,a blue square"
    python sample.py out/paligemma --image a.png --prompt "answer en what color is the shape?"

For --hf, the model file is the one whose HF_ARCHITECTURES lists the architecture in the folder's
config.json, and the tokenizer is the folder's tokenizer.model in Llama 3's tiktoken format.
Text appears as it is generated; the number of tokens per second goes to stderr at the end.
"""

import argparse
import ast
import codecs
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

import data
import train


DEFAULT_NEW_TOKENS = 200


class CliError(Exception):
    """Bad input, said in one sentence; main() prints it and returns 2."""


def model_for_architecture(architecture):
    """The model file whose HF_ARCHITECTURES names architecture, read without importing every file."""
    for name in train.model_choices():
        for node in ast.parse((train.ROOT / f"{name}.py").read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HF_ARCHITECTURES" for t in node.targets):
                if architecture in ast.literal_eval(node.value):
                    return train.import_model(name)
    raise CliError(f"no model file loads the architecture {architecture}")


def load_trained(folder):
    """(model, tokenizer, eos_id) from a folder that train.py wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, safe_open

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} holds no config.json; pass a folder written by train.py, or --hf for a Hugging Face one")
    try:
        saved = json.loads((folder / "config.json").read_text())
        module = train.import_model(saved["model"])
        model = module.Model(module.Config(**saved["config"]))
        with safe_open(folder / "model.safetensors", "pt") as f:
            metadata = f.metadata()
        load_model(model, folder / "model.safetensors")
        train.check_weights(model, folder / "model.safetensors", metadata)
        tokenizer = data.load_tokenizer(folder)
    except train.CliError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        raise CliError(f"cannot load the model in {folder} ({type(e).__name__}: {train.in_one_line(e)}); it may be "
                       "corrupt, incomplete or written by another version of its model file") from None
    return model, tokenizer, None


def load_hf(folder):
    """(model, tokenizer, eos_id) from a Hugging Face checkpoint folder with a Llama 3 tokenizer.model."""
    import bpe

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {folder / 'config.json'} ({e}); pass a Hugging Face checkpoint folder") from None
    architectures = config.get("architectures") or ["?"]
    module = model_for_architecture(architectures[0])
    if not (folder / "tokenizer.model").is_file():
        raise CliError(f"{folder} holds no tokenizer.model; sample.py reads Llama 3's tiktoken-format tokenizer")
    try:
        model = module.Model.from_pretrained(folder)
        tokenizer = bpe.Tokenizer.from_llama3(folder / "tokenizer.model")
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CliError(str(e)) from None
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return model, tokenizer, eos if isinstance(eos, int) else None


def new_tokens(args, room, context):
    """How many tokens to generate when room places of the context are left."""
    n = min(args.max_new_tokens or DEFAULT_NEW_TOKENS, room)
    if args.max_new_tokens and n < args.max_new_tokens:
        print(f"note: generating {n} tokens, what is left of the {context}-token context", file=sys.stderr)
    return n


def write_stream(tokens, tokenizer, eos_id):
    """Print each new piece of text as soon as it decodes, up to eos; return (tokens, seconds)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    count, start = 0, time.time()
    for token in tokens:
        t = int(token[0])
        if t == eos_id:
            break
        count += 1
        sys.stdout.write(utf8.decode(tokenizer.decode_bytes([t])))
        sys.stdout.flush()
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    sys.stdout.flush()
    return count, time.time() - start


def sampling(args, eos_id):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, seed=args.seed)


def stream(model, tokenizer, prompt, args, device, eos_id):
    """Print prompt, then its continuation as it is generated; return (tokens, seconds)."""
    ids = tokenizer.encode_ordinary(prompt)
    context = model.config.max_seq_len
    if not ids:
        raise CliError("the prompt is empty; give at least one character")
    if len(ids) >= context:
        raise CliError(f"the prompt is {len(ids)} tokens long but the model's context is {context}; shorten it")
    n = new_tokens(args, context - len(ids), context)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    return write_stream(model.generate_stream(idx, n, **sampling(args, eos_id)), tokenizer, eos_id)


def reads_images(model):
    """Whether the model generates text from images and a prefix (a vision-language model)."""
    return "pixel_values" in inspect.signature(model.generate_stream).parameters


def answer(model, tokenizer, pixels, prompt, args, device):
    """Print the model's answer to prompt about one image as it is generated; return (tokens, seconds).

    The prompt is asked as training asked it: bos, the prompt and a newline (data.prefix_ids)."""
    if data.BOS not in tokenizer.special_tokens or data.EOS not in tokenizer.special_tokens:
        raise CliError(f"the tokenizer has no {data.BOS} and {data.EOS}; sample.py asks models that train.py trained")
    ids = data.prefix_ids(tokenizer, prompt)
    context = model.config.max_seq_len
    room = context - model.config.n_image_tokens - len(ids)
    if room < 1:
        raise CliError(f"the prompt is {len(ids)} tokens long with bos and newline, and {model.config.n_image_tokens} "
                       f"image tokens leave {context - model.config.n_image_tokens} of the {context}-token context; "
                       "shorten it")
    n = new_tokens(args, room, context)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos_id = tokenizer.special_tokens[data.EOS]
    return write_stream(model.generate_stream(pixels[None].to(device), idx, n, **sampling(args, eos_id)), tokenizer,
                        eos_id)


def read_images(model, paths):
    """(path, pixels (3, S, S)) of each image, read with the model file's preprocess."""
    from PIL import Image, UnidentifiedImageError

    preprocess = getattr(sys.modules[type(model).__module__], "preprocess", None)
    if preprocess is None:
        raise CliError("this model does not read images; --image needs an image model such as siglip or paligemma")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append((path, preprocess(image, model.config.image_size)))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise CliError(f"cannot read the image {path} ({e}); pass a PNG, JPEG or other image pillow reads") from None
    return images


def rank_labels(model, tokenizer, args, device):
    """For each image, every label with the probability the model gives it, best first."""
    if not hasattr(model, "classify"):
        raise CliError("this model does not rank captions for images; --labels needs an image-text model such as siglip")
    labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
    if not labels:
        raise CliError('give the captions to rank with --labels, separated by commas: --labels "a red circle,a blue square"')
    label_ids = data.caption_ids(tokenizer, labels, model.config.max_seq_len).to(device)
    for path, pixels in read_images(model, args.image):
        probs = model.classify(pixels[None].to(device), label_ids)[0].cpu()
        print(f"{path}:")
        for j in probs.argsort(descending=True).tolist():
            print(f"  {probs[j]:.3f}  {labels[j]}")
        sys.stdout.flush()


def parse_args(argv):
    class Help(train.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=Help)
    p.add_argument("folder", nargs="?", help="a folder written by train.py (e.g. out/gpt_llama)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint folder instead (config.json, safetensors, tokenizer.model)")
    p.add_argument("--prompt", default=None, help="text to continue, or with --image a question to answer; without it, "
                   "read one prompt per line from stdin until EOF")
    p.add_argument("--image", nargs="+", metavar="FILE", help="images: ranked against --labels by an image-text model, "
                   "or asked --prompt by a vision-language model")
    p.add_argument("--labels", default=None, help='comma-separated captions to rank for each --image, e.g. "a red circle,a blue square"')
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"tokens to generate (default: {DEFAULT_NEW_TOKENS}, or what the context leaves)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 for all")
    p.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of tokens of this total probability")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    args = p.parse_args(argv)
    if (args.folder is None) == (args.hf is None):
        raise CliError("pass either a folder written by train.py or --hf DIR")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CliError("--max-new-tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CliError(f"--temperature must be 0 (greedy) or a positive number, got {args.temperature}")
    if args.top_k < 0:
        raise CliError(f"--top-k must be 0 (all tokens) or more, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise CliError(f"--seed must be 0 or more, got {args.seed}")
    args.top_k = args.top_k or None
    return args


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        device = train.pick_device(args.device)
        model, tokenizer, eos_id = load_hf(args.hf) if args.hf else load_trained(args.folder)
        model.to(device).eval()
        if args.image and (args.labels is not None or not hasattr(model, "generate_stream")):
            rank_labels(model, tokenizer, args, device)
            return 0
        if not hasattr(model, "generate_stream"):
            raise CliError("this model does not generate text; give it images with --image and captions with --labels")
        if reads_images(model) and not args.image:
            raise CliError("this model answers prompts about images; give it one or more with --image")
        if args.image and not reads_images(model):
            raise CliError("this model does not read images; --image needs an image model such as siglip or paligemma")
        images = read_images(model, args.image) if args.image else None
        prompts = [args.prompt] if args.prompt is not None else None
        if prompts is None and sys.stdin.isatty():
            print("one prompt per line; Ctrl-D to quit", file=sys.stderr)
        tokens = seconds = 0
        for line in prompts or sys.stdin:
            line = line.rstrip("\n")
            if prompts is None and not line.strip():
                continue
            try:
                if images is None:
                    n, s = stream(model, tokenizer, line, args, device, eos_id)
                    tokens, seconds = tokens + n, seconds + s
                for path, pixels in images or ():
                    sys.stdout.write(f"{path}: " if len(images) > 1 else "")
                    n, s = answer(model, tokenizer, pixels, line, args, device)
                    tokens, seconds = tokens + n, seconds + s
            except ValueError as e:  # the model refuses the options (e.g. top_p outside (0, 1])
                raise CliError(str(e)) from None
        if tokens:
            print(f"{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr)
        return 0
    except (CliError, train.CliError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
