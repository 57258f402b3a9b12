"""
Stream text from a model trained by train.py, or from a Hugging Face checkpoint folder; chat with a
Hugging Face instruct model; rank captions for images with an image-text model; answer prompts about
images with a vision-language model.

    python sample.py out/gpt_llama --prompt "The"        # a folder written by train.py
    python sample.py out/gpt_llama                       # interactive: one prompt per line until EOF
    python sample.py --hf path/to/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python sample.py --hf path/to/Qwen2.5-0.5B-Instruct --chat --prompt "Name three colours."
    python sample.py --hf path/to/SmolLM2-135M-Instruct --chat    # one user turn per line until EOF
    python sample.py out/gpt_llama-pydoc_chats --chat    # a model train.py fine-tuned on conversations
    python sample.py out/siglip --image examples/pictures/red_circle.png examples/pictures/blue_square.png --labels "a red circle,a blue square"
    python sample.py out/paligemma --image examples/pictures/red_circle.png --prompt "answer en what color is the shape?"
    python sample.py out/gpt_llama --prompt "The cat sat on the" --show   # pictures of inside the model

--show draws, instead of sampling (inside.py records, pictures.py draws, into FOLDER/inside or --show-dir):
for a text model, each layer's attention heads, the next-token probabilities, the logit lens and a
mixture of experts' routing over the prompt; for an image-text model, the caption probabilities and its
pooling head's attention over each image; for a vision-language model, after its answer, where each
answer token looked in the image and in the text. numbers.npz beside the PNGs holds what they draw.

For --hf, the model file is the one whose HF_ARCHITECTURES lists the architecture in the folder's
config.json; the tokenizer is the folder's tokenizer.json, else Llama 3's tokenizer.model; an answer
ends at any eos_token_id of generation_config.json, else of config.json (a folder train.py fine-tuned
keeps those of its --init). --chat wraps each turn in the folder's chat format (chat.py: its chat template,
read with jinja2 as transformers reads it, else a built-in format), which a folder train.py fine-tuned on
conversations keeps from its --init, and sends the whole conversation each turn, dropping its oldest
turns when it outgrows the context; an answer also ends at the token that ends a message in that format.
Text appears as it is generated; the number of tokens per second goes to stderr at the end.
"""

import argparse
import codecs
import inspect
import math
import os
import sys
import time
from pathlib import Path

import torch

from llm_machinery import chat, images, inside, pictures, runs
from llm_machinery.corpus import UserError


DEFAULT_NEW_TOKENS = 200
# In a chat, an answer has at least this share of the context (or --max-new-tokens, if less) before the
# oldest turns give way: room for a sentence on a small model, without dropping turns that still fit.
MIN_ANSWER_SHARE = 0.25


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
    if not ids:
        print("(an empty answer: the model ended it at once)", file=sys.stderr)
    return ids, time.time() - start


def sampling(args, eos_id):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, seed=args.seed)


def check_fits(ids, context):
    if len(ids) >= context:
        raise UserError(f"the prompt is {len(ids)} tokens long but the model's context is {context}; shorten it")


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
        raise UserError("the prompt is empty; give at least one character")
    check_fits(ids, model.config.max_seq_len)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    return continuation(model, tokenizer, ids, args, device, eos_ids)


def chat_turn(model, tokenizer, chat_format, history, prompt, args, device, eos_ids):
    """Print the answer to prompt, the next user turn of the conversation history, which gains the
    turn and the answer; return (the ids printed, seconds).

    The whole conversation is the model's prompt, so that it answers in context, and the answer may take
    what the context has left. Only when that is less than an answer needs (MIN_ANSWER_SHARE) do the
    oldest turns, a question and its answer, give way, and the note names each."""
    history.append({"role": "user", "content": prompt})
    ids = chat_format.prompt(history)
    context = model.config.max_seq_len
    needed = min(args.max_new_tokens or DEFAULT_NEW_TOKENS, max(1, int(context * MIN_ANSWER_SHARE)))
    while len(history) > 1 and context - len(ids) < needed:
        question = history[0]["content"]
        del history[:2]
        print(f"note: the conversation outgrew the {context}-token context, so its oldest turn gave way: "
              f"{question[:40] + '...' if len(question) > 40 else question!r}", file=sys.stderr)
        ids = chat_format.prompt(history)
    check_fits(ids, context)
    new, seconds = continuation(model, tokenizer, ids, args, device, eos_ids)
    history.append({"role": "assistant", "content": tokenizer.decode(new)})
    return new, seconds


def reads_images(model):
    """Whether the model generates text from images and a prefix (a vision-language model)."""
    return "pixel_values" in inspect.signature(model.generate_stream).parameters


def answer(model, tokenizer, pixels, prompt, args, device):
    """Print the model's answer to prompt about one image as it is generated; return (the ids printed, seconds).

    The prompt is asked as training asked it: bos, the prompt and a newline (images.prefix_ids)."""
    if images.BOS not in tokenizer.special_tokens or images.EOS not in tokenizer.special_tokens:
        raise UserError(f"the tokenizer has no {images.BOS} and {images.EOS}; sample.py asks models that train.py trained")
    ids = images.prefix_ids(tokenizer, prompt)
    context = model.config.max_seq_len
    room = context - model.config.n_image_tokens - len(ids)
    if room < 1:
        raise UserError(f"the prompt is {len(ids)} tokens long with bos and newline, and {model.config.n_image_tokens} "
                       f"image tokens leave {context - model.config.n_image_tokens} of the {context}-token context; "
                       "shorten it")
    n = new_tokens(args, room, context)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos_id = tokenizer.special_tokens[images.EOS]
    return write_stream(model.generate_stream(pixels[None].to(device), idx, n, **sampling(args, eos_id)), tokenizer,
                        {eos_id})


def read_images(model, paths):
    """(path, pixels (3, S, S)) of each image, read with the model file's preprocess."""
    from PIL import Image, UnidentifiedImageError

    preprocess = getattr(sys.modules[type(model).__module__], "preprocess", None)
    if preprocess is None:
        raise UserError("this model does not read images; --image needs an image model such as siglip or paligemma")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append((path, preprocess(image, model.config.image_size)))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read the image {path} ({e}); pass a PNG, JPEG or other image pillow reads") from None
    return images


def rank_labels(model, tokenizer, args, device):
    """For each image, every label with the probability the model gives it, best first."""
    if not hasattr(model, "classify"):
        raise UserError("this model does not rank captions for images; --labels needs an image-text model such as siglip")
    labels = [label.strip() for label in (args.labels or "").split(",") if label.strip()]
    if not labels:
        raise UserError('give the captions to rank with --labels, separated by commas: --labels "a red circle,a blue square"')
    label_ids = images.caption_ids(tokenizer, labels, model.config.max_seq_len).to(device)
    for path, pixels in read_images(model, args.image):
        probs = model.classify(pixels[None].to(device), label_ids)[0].cpu()
        print(f"{path}:")
        for j in probs.argsort(descending=True).tolist():
            print(f"  {probs[j]:.3f}  {labels[j]}")
        sys.stdout.flush()


def show_folder(args):
    """The folder --show will write into, checked before any work so that bad input writes nothing."""
    folder = Path(args.show_dir or Path(args.hf or args.folder) / "inside")
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        why = "is a file" if nearest.exists() and not nearest.is_dir() else "is not writable"
        raise UserError(f"cannot write the pictures into {folder}: {nearest} {why}; pass another --show-dir")
    return folder


def show(arrays, draw, folder):
    """Save arrays beside the pictures that draw(folder) writes, and print each path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = draw(folder)
    inside.save_numbers(folder / "numbers.npz", arrays)
    for path in paths + [folder / "numbers.npz"]:
        print(path)


def show_captions(model, tokenizer, args, device, folder, title):
    """--show for an image-text model: the images against the --labels, and where its pooling head looks."""
    shown = read_images(model, args.image)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    label_ids = images.caption_ids(tokenizer, labels, model.config.max_seq_len).to(device)
    pixels = torch.stack([p for _, p in shown]).to(device)
    arrays = inside.look_at_images(model, tokenizer, pixels, label_ids, labels)
    names = [Path(path).name for path, _ in shown]
    show(arrays, lambda f: pictures.draw_images(arrays, names, f, title), folder)


def show_answer(model, tokenizer, pixels, prompt, new, path, folder, title):
    """--show for a vision-language model: where its answer new (ids) to prompt looked in the image."""
    arrays = inside.look_at_answer(model, tokenizer, pixels[None], images.prefix_ids(tokenizer, prompt), new)
    show(arrays, lambda f: pictures.draw_answer(arrays, Path(path).name, f, title), folder)


def parse_args(argv):
    class Help(runs.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = runs.ArgumentParser(prog="sample.py", description=__doc__.strip(), formatter_class=Help)
    p.add_argument("folder", nargs="?", help="a folder written by train.py (e.g. out/gpt_llama)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint folder instead (config.json, safetensors, "
                   "tokenizer.json or tokenizer.model)")
    p.add_argument("--chat", action="store_true", help="talk to an instruct model in its chat format; each prompt is "
                   "a user turn, answered with the conversation so far in context")
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
    p.add_argument("--show", action="store_true", help="draw what the model does inside instead of sampling from "
                   "it: attention, next tokens, logit lens, experts (text, --prompt); captions and pooling (--labels); "
                   "where the answer looked in the image (--image --prompt); PNGs and numbers.npz")
    p.add_argument("--show-dir", metavar="DIR", default=None, help="where --show writes (default: FOLDER/inside)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="with --hf: the weights' dtype; bfloat16 keeps a bf16 checkpoint as it is, in half the memory")
    args = p.parse_args(argv)
    if (args.folder is None) == (args.hf is None):
        raise UserError("pass either a folder written by train.py or --hf DIR")
    if args.chat and args.image:
        raise UserError("--chat takes text turns, not --image")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (all tokens) or more, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if args.show and args.chat:
        raise UserError("--show draws one prompt, not a conversation; drop --chat")
    if args.show_dir and not args.show:
        raise UserError("--show-dir is where --show writes; add --show")
    args.top_k = args.top_k or None
    return args


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        device = runs.pick_device(args.device)
        if args.dtype != "float32" and not args.hf:
            raise UserError("--dtype applies to --hf folders; a folder train.py wrote holds float32 weights")
        model, tokenizer, eos_ids = runs.load_hf(args.hf, args.dtype) if args.hf else runs.load_run(args.folder)
        model.to(device).eval()
        title = Path(args.hf or args.folder).name
        folder = None
        if args.show:
            pictures.require_matplotlib()
            folder = show_folder(args)
        if args.image and (args.labels is not None or not hasattr(model, "generate_stream")):
            rank_labels(model, tokenizer, args, device)
            if folder:
                show_captions(model, tokenizer, args, device, folder, title)
            return 0
        if not hasattr(model, "generate_stream"):
            raise UserError("this model does not generate text; give it images with --image and captions with --labels")
        if reads_images(model) and not args.image:
            raise UserError("this model answers prompts about images; give it one or more with --image")
        if args.image and not reads_images(model):
            raise UserError("this model does not read images; --image needs an image model such as siglip or paligemma")
        images = read_images(model, args.image) if args.image else None
        if folder and args.prompt is None:
            raise UserError("--show draws one prompt; give it with --prompt")
        if folder and images is None:
            ids = tokenizer.encode_ordinary(args.prompt)
            if not ids:
                raise UserError("the prompt is empty; give at least one character")
            arrays = inside.look_at_text(model, tokenizer, ids)
            show(arrays, lambda f: pictures.draw_text(arrays, f, title), folder)
            return 0
        if folder and len(images) > 1:
            raise UserError("--show draws where the answer looked in one image; pass one --image")
        chat_format = chat.chat_format(Path(args.hf or args.folder), tokenizer) if args.chat else None
        if chat_format is not None:
            eos_ids |= chat_format.end_ids
            if args.folder and not chat.taught_to_answer(args.folder):
                print(f"note: {args.folder} learnt from text alone and was never taught to answer, so it will go on "
                      f"with your words rather than reply; teach it with: python train.py --init {args.folder} "
                      "--data examples/pydoc_chats.jsonl (or a file of your own conversations)", file=sys.stderr)
            elif chat_format.note:
                print(f"note: {chat_format.note}", file=sys.stderr)
        if args.prompt is None and sys.stdin.isatty():
            print(f"one {'turn' if chat_format else 'prompt'} per line; Ctrl-D to quit", file=sys.stderr)
        tokens = seconds = 0
        history = []
        for line in prompt_lines(args):
            if args.prompt is None and not line.strip():
                continue
            try:
                if chat_format is not None:
                    new, s = chat_turn(model, tokenizer, chat_format, history, line, args, device, eos_ids)
                    tokens, seconds = tokens + len(new), seconds + s
                elif images is None:
                    new, s = stream(model, tokenizer, line, args, device, eos_ids)
                    tokens, seconds = tokens + len(new), seconds + s
                for path, pixels in images or ():
                    sys.stdout.write(f"{path}: " if len(images) > 1 else "")
                    new, s = answer(model, tokenizer, pixels, line, args, device)
                    tokens, seconds = tokens + len(new), seconds + s
                    if folder:
                        show_answer(model, tokenizer, pixels.to(device), line, new, path, folder, title)
            except ValueError as e:  # the model refuses the options (e.g. top_p outside (0, 1])
                raise UserError(str(e)) from None
        if seconds:  # something was asked, even if nothing came back
            print(f"{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (sample.py ... | head -1): stop quietly, as Unix tools do. Python would
        # flush stdout once more on the way out and complain; the flush now goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def prompt_lines(args):
    """--prompt, else one line of standard input after another; at a terminal, after a "> " marker."""
    if args.prompt is not None:
        yield args.prompt
    elif not sys.stdin.isatty():
        yield from (line.rstrip("\n") for line in sys.stdin)
    else:
        while True:
            try:
                yield input("> ")
            except EOFError:
                print(file=sys.stderr)
                return


if __name__ == "__main__":
    sys.exit(main())
