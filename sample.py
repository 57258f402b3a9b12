"""
Stream text from a model trained by train.py, or from a Hugging Face checkpoint folder; chat with a
Hugging Face instruct model; rank captions for images with an image-text model; answer prompts about
images with a vision-language model.

    python sample.py out/gpt_llama --prompt "The"        # a folder written by train.py
    python sample.py out/gpt_llama                       # interactive: one prompt per line until EOF
    python sample.py --hf path/to/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python sample.py --hf path/to/Qwen2.5-0.5B-Instruct --chat --prompt "Name three colours."
    python sample.py --hf path/to/SmolLM2-135M-Instruct --chat    # one user turn per line until EOF
    python sample.py out/siglip --image a.png b.png --labels "a red circle,a blue square"
    python sample.py out/paligemma --image a.png --prompt "answer en what color is the shape?"

For --hf, the model file is the one whose HF_ARCHITECTURES lists the architecture in the folder's
config.json; the tokenizer is the folder's tokenizer.json, else Llama 3's tokenizer.model; an answer
ends at any eos_token_id of generation_config.json, else of config.json. --chat wraps each turn in the
folder's chat template (chat_template.jinja or tokenizer_config.json's, read with jinja2 as transformers
reads it), else in the Llama 3 or ChatML format that the tokenizer's special tokens show, and sends the
whole conversation each turn, dropping its oldest turns when it outgrows the context.
Text appears as it is generated; the number of tokens per second goes to stderr at the end.
"""

import argparse
import codecs
import inspect
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

import data
import train


DEFAULT_NEW_TOKENS = 200


class CliError(Exception):
    """Bad input, said in one sentence; main() prints it and returns 2."""


def load_trained(folder):
    """(model, tokenizer, eos_ids) from a folder that train.py wrote: no eos ids, since its text has no end token."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} holds no config.json; pass a folder written by train.py, or --hf for a Hugging Face one")
    saved = train.read_folder_config(folder)
    if not isinstance(saved.get("model"), str) or not isinstance(saved.get("config"), dict):
        raise CliError(f"{folder} was not written by train.py; pass --hf {folder} for a Hugging Face folder")
    model = train.load_folder(folder, train.import_model(saved["model"]))
    try:
        tokenizer = data.load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the tokenizer in {folder} ({train.in_one_line(e)})") from None
    return model, tokenizer, frozenset()


def load_hf(folder, dtype="float32"):
    """(model, tokenizer, eos_ids) from a Hugging Face checkpoint folder, the weights in dtype."""
    folder = Path(folder)
    config = read_json(folder / "config.json", "pass a Hugging Face checkpoint folder")
    architectures = config.get("architectures") or ["?"]
    module = train.import_model(train.model_for_architecture(architectures[0]))
    takes_dtype = "dtype" in inspect.signature(module.Model.from_pretrained).parameters
    if dtype != "float32" and not takes_dtype:
        raise CliError(f"{module.__name__}.py loads its weights in float32 only; leave --dtype out")
    try:
        tokenizer = data.load_tokenizer(folder)
        model = module.Model.from_pretrained(folder, dtype=dtype) if takes_dtype else module.Model.from_pretrained(folder)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CliError(str(e)) from None
    return model, tokenizer, eos_ids(folder, config)


def read_json(path, advice):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path} ({e}); {advice}") from None


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
        raise CliError(f"the eos_token_id {eos!r} in {folder} is neither a token id nor a list of them")
    return frozenset(ids)


# The special tokens a chat template may name, passed to it by name as transformers passes them.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def llama3_chat(messages):
    return "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def chatml_chat(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


# Chat formats for a folder without a chat template, or without jinja2 to read one, recognised by their
# special tokens: (name, its tokens, messages -> text ending in the assistant's header). Each is what
# the instruct models' own templates write when no system prompt is given: Llama 3's, and ChatML's (Qwen,
# SmolLM2, ...), whose newer templates add a default system prompt or dates that these leave out.
BUILT_IN_CHATS = (
    ("Llama 3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), llama3_chat),
    ("ChatML", ("<|im_start|>", "<|im_end|>"), chatml_chat),
)


def chat_format(folder, tokenizer):
    """A function messages -> the prompt ids that ask the model for the assistant's next message.

    The folder's own chat template, rendered as transformers' apply_chat_template(messages,
    add_generation_prompt=True) renders it, when jinja2 is installed; else the built-in format
    whose special tokens the tokenizer has."""
    template = chat_template(folder)
    render = jinja_renderer(template, folder) if template is not None else None
    if render is None:
        built_in = [(name, text) for name, tokens, text in BUILT_IN_CHATS if all(t in tokenizer.special_tokens for t in tokens)]
        names = " or ".join(name for name, _, _ in BUILT_IN_CHATS)
        if not built_in and template is None:
            raise CliError(f"--chat needs a chat template, and {folder} has none (no chat_template.jinja, no "
                           f"chat_template in tokenizer_config.json) nor the special tokens of {names} to fall back on")
        if not built_in:
            raise CliError(f"--chat needs jinja2 3.1.6 or later (pip install -U jinja2) to read the chat template "
                           f"of {folder}, whose tokenizer lacks the special tokens of {names} to fall back on")
        name, render = built_in[0]
        if template is not None:
            print(f"note: without jinja2 3.1.6 or later to read the chat template of {folder}, the chat takes "
                  f"the built-in {name} format", file=sys.stderr)
    # Like transformers, the text is tokenized with every special token recognised, those the user
    # types included.
    return lambda messages: tokenizer.encode(render(messages), allowed_special="all")


def chat_template(folder):
    """The folder's chat template as transformers picks it: chat_template.jinja, else tokenizer_config.json's
    chat_template (a string, or a list of named templates of which "default" is the one to chat with); None
    when there is neither."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise CliError(f"cannot read {path} ({e}); fix or remove it") from None
    template = tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise CliError(f"the tokenizer_config.json of {folder} names its chat templates {sorted(map(str, named))} "
                           "but none default, the one to chat with")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise CliError(f"the chat_template in the tokenizer_config.json of {folder} is neither text nor a list of them")
    return template


def tokenizer_config(folder):
    path = folder / "tokenizer_config.json"
    return read_json(path, "fix or remove it") if path.is_file() else {}


def jinja_renderer(template, folder):
    """A function messages -> text by template, rendered in a sandbox with what transformers'
    apply_chat_template gives a template; None without jinja2 3.1.6 or later, the first release
    without known ways out of the sandbox (chat templates come from the internet)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        return None
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        return None

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's text for training masks; it writes
        its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)  # Llama 3.1's date
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        raise CliError(f"cannot read the chat template of {folder} ({e})") from None
    config = tokenizer_config(folder)
    tokens = {name: token.get("content") if isinstance(token, dict) else token
              for name in TEMPLATE_TOKENS if (token := config.get(name)) is not None}

    def render(messages):
        try:
            return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True, **tokens)
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # raise_exception, or a template that breaks
            raise CliError(f"the chat template of {folder} refuses the conversation ({e})") from None

    return render


def new_tokens(args, room, context):
    """How many tokens to generate when room places of the context are left."""
    n = min(args.max_new_tokens or DEFAULT_NEW_TOKENS, room)
    if args.max_new_tokens and n < args.max_new_tokens:
        print(f"note: generating {n} tokens, what is left of the {context}-token context", file=sys.stderr)
    return n


def write_stream(tokens, tokenizer, stop):
    """Print each new piece of text as soon as it decodes, up to the first id in stop, which is not
    printed; return (the ids printed, seconds)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    ids, start = [], time.time()
    for token in tokens:
        t = int(token[0])
        if t in stop:
            break
        ids.append(t)
        sys.stdout.write(utf8.decode(tokenizer.decode_bytes([t])))
        sys.stdout.flush()
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    sys.stdout.flush()
    return ids, time.time() - start


def sampling(args, eos_id):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, seed=args.seed)


def check_fits(ids, context):
    if len(ids) >= context:
        raise CliError(f"the prompt is {len(ids)} tokens long but the model's context is {context}; shorten it")


def continuation(model, tokenizer, ids, args, device, eos_ids):
    """Print what the model writes after ids, up to any of eos_ids; return (the ids printed, seconds)."""
    context = model.config.max_seq_len
    n = new_tokens(args, context - len(ids), context)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    # generate_stream stops at one eos_id; with a single row, write_stream stopping at the first of
    # several ends the answer at the same token.
    return write_stream(model.generate_stream(idx, n, **sampling(args, None)), tokenizer, eos_ids)


def stream(model, tokenizer, prompt, args, device, eos_ids):
    """Print prompt, then its continuation as it is generated; return (the ids printed, seconds)."""
    ids = tokenizer.encode_ordinary(prompt)
    if not ids:
        raise CliError("the prompt is empty; give at least one character")
    check_fits(ids, model.config.max_seq_len)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    return continuation(model, tokenizer, ids, args, device, eos_ids)


def chat(model, tokenizer, render, history, prompt, args, device, eos_ids):
    """Print the answer to prompt, the next user turn of the conversation history, which gains the
    turn and the answer; return (the ids printed, seconds).

    The whole conversation is the model's prompt, so that it answers in context. When it leaves less
    room than the answer asks for, its oldest turns (a question and its answer) give way."""
    history.append({"role": "user", "content": prompt})
    ids = render(history)
    context = model.config.max_seq_len
    while len(history) > 1 and len(ids) + (args.max_new_tokens or DEFAULT_NEW_TOKENS) > context:
        del history[:2]
        print(f"note: dropped the oldest turn of the conversation to fit the {context}-token context", file=sys.stderr)
        ids = render(history)
    check_fits(ids, context)
    new, seconds = continuation(model, tokenizer, ids, args, device, eos_ids)
    history.append({"role": "assistant", "content": tokenizer.decode(new)})
    return new, seconds


def reads_images(model):
    """Whether the model generates text from images and a prefix (a vision-language model)."""
    return "pixel_values" in inspect.signature(model.generate_stream).parameters


def answer(model, tokenizer, pixels, prompt, args, device):
    """Print the model's answer to prompt about one image as it is generated; return (the ids printed, seconds).

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
                        {eos_id})


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
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint folder instead (config.json, safetensors, "
                   "tokenizer.json or tokenizer.model)")
    p.add_argument("--chat", action="store_true", help="with --hf: talk to an instruct model in its chat format; each "
                   "prompt is a user turn, answered with the conversation so far in context")
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
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="with --hf: the weights' dtype; bfloat16 keeps a bf16 checkpoint as it is, in half the memory")
    args = p.parse_args(argv)
    if (args.folder is None) == (args.hf is None):
        raise CliError("pass either a folder written by train.py or --hf DIR")
    if args.chat and args.hf is None:
        raise CliError("--chat talks to a Hugging Face instruct model; pass its folder with --hf DIR")
    if args.chat and args.image:
        raise CliError("--chat takes text turns, not --image")
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
        if args.dtype != "float32" and not args.hf:
            raise CliError("--dtype applies to --hf folders; a folder train.py wrote holds float32 weights")
        model, tokenizer, eos_ids = load_hf(args.hf, args.dtype) if args.hf else load_trained(args.folder)
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
        render = chat_format(Path(args.hf), tokenizer) if args.chat else None
        prompts = [args.prompt] if args.prompt is not None else None
        if prompts is None and sys.stdin.isatty():
            print(f"one {'turn' if render else 'prompt'} per line; Ctrl-D to quit", file=sys.stderr)
        tokens = seconds = 0
        history = []
        for line in prompts or sys.stdin:
            line = line.rstrip("\n")
            if prompts is None and not line.strip():
                continue
            try:
                if render:
                    new, s = chat(model, tokenizer, render, history, line, args, device, eos_ids)
                    tokens, seconds = tokens + len(new), seconds + s
                elif images is None:
                    new, s = stream(model, tokenizer, line, args, device, eos_ids)
                    tokens, seconds = tokens + len(new), seconds + s
                for path, pixels in images or ():
                    sys.stdout.write(f"{path}: " if len(images) > 1 else "")
                    new, s = answer(model, tokenizer, pixels, line, args, device)
                    tokens, seconds = tokens + len(new), seconds + s
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
