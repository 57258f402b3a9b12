"""
Chat formats: how a model folder writes a conversation, a list of {"role": "system" | "user" | "assistant",
"content": text}, as token ids. One renderer serves both sides of a chat model, so that training sees
the tokens that chatting sends (ChatFormat):
    prompt(messages)   the conversation so far, ending in the header of the assistant's next message:
                       what sample.py --chat sends
    tokens(messages)   a whole conversation, and which of its tokens are the assistant's: what
                       fine-tuning on conversations (conversations.py) trains on

A checkpoint folder's own chat template (chat_template.jinja, else tokenizer_config.json's
chat_template) is rendered as transformers' apply_chat_template renders it, with jinja2 in a sandbox
(templates come from the internet). A folder without one, or a machine without jinja2, falls back on
the Llama 3 or ChatML format that the tokenizer's special tokens show, and a tokenizer with neither
(train.py's own has no special tokens) on a plain-text format whose messages end in the byte 0x04.

The assistant's tokens: where the template marks them with {% generation %}...{% endgeneration %},
the marked text, as transformers' return_assistant_tokens_mask finds it; elsewhere (most templates,
and the built-in formats) each assistant message is what the template adds to the conversation before
it, rendered with the generation prompt, when the message joins it. Either way they end with the first
end-of-turn token among them (end_ids: the built-in format's, or the folder's eos ids), and what follows
it (the newline of ChatML) belongs to the next header; marked text without one takes the end-of-turn
token right after it. The text is tokenized in pieces cut where the assistant's tokens begin and end, so
the prompt before an answer is exactly the ids prompt() gives for it.
"""

import re
from datetime import datetime
from pathlib import Path

from llm_machinery.corpus import UserError
from llm_machinery.runs import eos_ids, read_folder_config, read_json

# The special tokens a chat template may name, passed to it by name as transformers passes them.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# What {% generation %} writes around the text it marks: private-use characters, which tokens() finds and
# removes, and prompt() removes.
GENERATION = ("\U000f0000", "\U000f0001")
# Each message of the plain-text format ends in ASCII's end of transmission: one of the 256 byte tokens of
# every byte-level BPE vocabulary, which no merge learned from text holds, so a model can write it and
# sample.py stop at it.
PLAIN_END = "\x04"


def llama3_chat(messages, add_generation_prompt=True):
    return "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    ) + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def chatml_chat(messages, add_generation_prompt=True):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
        "<|im_start|>assistant\n" if add_generation_prompt else "")


def plain_chat(messages, add_generation_prompt=True):
    r"""'user:\nWhat is 2 + 2?\x04\nassistant:\n4\x04\n': each header ends in a newline, so that the text
    after it is tokenized alike whether the model or the data writes it."""
    return "".join(f"{m['role']}:\n{m['content'].strip()}{PLAIN_END}\n" for m in messages) + (
        "assistant:\n" if add_generation_prompt else "")


# Chat formats for a folder without a chat template, or without jinja2 to read one: (name, the special
# tokens that show it, the token that ends a message, messages and add_generation_prompt -> text). The
# first two are what the instruct models' own templates write when no system prompt is given: Llama 3's,
# and ChatML's (Qwen, SmolLM2, ...), whose newer templates add a default system prompt or dates that these
# leave out. The plain-text one needs no special token; only models fine-tuned in it know it.
BUILT_IN_CHATS = (
    ("Llama 3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>", llama3_chat),
    ("ChatML", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", chatml_chat),
    ("plain-text", (), PLAIN_END, plain_chat),
)


class ChatFormat:
    """A folder's way of writing conversations: render(messages, add_generation_prompt) -> text, which
    the tokenizer encodes with every special token recognised, those the user types included, as
    transformers does; end_ids, the tokens that end an assistant message; source, the template or the
    built-in format's name (what the format depends on); note, what to tell the user of a fallback."""

    def __init__(self, name, render, tokenizer, end_ids, source, note=None):
        self.name, self.render, self.tokenizer = name, render, tokenizer
        self.end_ids, self.source, self.note = frozenset(end_ids), source, note

    def encode(self, text):
        return self.tokenizer.encode(text, allowed_special="all")

    def prompt(self, messages):
        """The ids that ask the model for the assistant's next message after messages."""
        return self.encode(unmarked(self.render(messages, True)))

    def tokens(self, messages):
        """(ids, scored) of a whole conversation: scored[t] is True where token t is the assistant's."""
        text = self.render(messages, False)
        if GENERATION[0] in text:
            text, spans = marked_spans(text)
        else:
            spans = self.assistant_spans(messages, text)
        ids, scored, done, follows = [], [], 0, []
        for start, end in spans:
            ids += self.encode(text[done:start])
            piece = self.encode(text[start:end])
            n = next((j + 1 for j, t in enumerate(piece) if t in self.end_ids), len(piece))
            scored += [False] * (len(ids) - len(scored)) + [True] * n + [False] * (len(piece) - n)
            if n == 0 or piece[n - 1] not in self.end_ids:
                follows.append(len(ids) + len(piece))  # where its end-of-turn token must be
            ids += piece
            done = end
        ids += self.encode(text[done:])
        scored += [False] * (len(ids) - len(scored))
        for at in follows:
            if at >= len(ids) or ids[at] not in self.end_ids:
                names = ", ".join(repr(self.tokenizer.decode([t])) for t in sorted(self.end_ids)) or "none"
                raise UserError(f"{self.name} ends an assistant message without an end-of-turn token (the folder's "
                                f"eos ids: {names}), so a model could not learn where its answer stops")
            scored[at] = True
        return ids, scored

    def assistant_spans(self, messages, text):
        """(start, end) in text of each assistant message: what rendering it adds to the conversation
        before it with the generation prompt."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before, through = self.render(messages[:i], True), self.render(messages[: i + 1], False)
                if not (through.startswith(before) and text.startswith(through)):
                    raise UserError(f"{self.name} writes the start of a conversation one way before an assistant "
                                    "message and another way with it, so the assistant's part cannot be told apart; "
                                    "mark it with {% generation %} in the template")
                spans.append((len(before), len(through)))
        return spans


def unmarked(text):
    return text.replace(GENERATION[0], "").replace(GENERATION[1], "")


def marked_spans(text):
    """(text without the generation marks, the (start, end) of each marked stretch in it)."""
    plain, spans, start = [], [], 0
    for part in re.split(f"({GENERATION[0]}|{GENERATION[1]})", text):
        if part == GENERATION[0]:
            start = sum(map(len, plain))
        elif part == GENERATION[1]:
            spans.append((start, sum(map(len, plain))))
        else:
            plain.append(part)
    return "".join(plain), spans


def chat_format(folder, tokenizer):
    """The ChatFormat of the model in folder (None: a tokenizer trained here, without a folder): its own
    chat template, read with jinja2 3.1.6 or later; else the first built-in format whose special tokens
    the tokenizer has."""
    template = chat_template(folder) if folder is not None else None
    render = jinja_renderer(template, folder) if template is not None else None
    if render is not None:
        config = read_json(folder / "config.json", "fix or remove it") if (folder / "config.json").is_file() else {}
        ends = set(eos_ids(folder, config if isinstance(config, dict) else {}))
        eos = tokenizer_config(folder).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos in tokenizer.special_tokens:
            ends.add(tokenizer.special_tokens[eos])
        return ChatFormat(f"the chat template of {folder}", render, tokenizer, ends, template)
    name, _, end, text = next(chat for chat in BUILT_IN_CHATS if all(t in tokenizer.special_tokens for t in chat[1]))
    if template is not None and name == "plain-text":
        names = " or ".join(chat[0] for chat in BUILT_IN_CHATS[:-1])
        raise UserError(f"the chat template of {folder} needs jinja2 3.1.6 or later (pip install -e \".[chat]\") to be "
                        f"read, and its tokenizer lacks the special tokens of {names} to fall back on")
    if template is not None:
        note = (f"without jinja2 3.1.6 or later to read the chat template of {folder}, conversations take the "
                f"built-in {name} format")
    else:
        note = f"{folder or 'a tokenizer trained here'} has no chat template, so conversations take the built-in {name} format"
    ids = [tokenizer.special_tokens[end]] if end in tokenizer.special_tokens else tokenizer.encode_ordinary(end)
    if len(ids) != 1:
        raise UserError(f"the tokenizer of {folder} writes {end!r} in {len(ids)} tokens, so the {name} chat format "
                        "could not end a message with one")
    return ChatFormat(f"the built-in {name} format", text, tokenizer, ids, name, note)


def chat_template(folder):
    """The folder's chat template as transformers picks it: chat_template.jinja, else tokenizer_config.json's
    chat_template (a string, or a list of named templates of which "default" is the one to chat with); None
    when there is neither."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); fix or remove it") from None
    template = tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"the tokenizer_config.json of {folder} names its chat templates {sorted(map(str, named))} "
                           "but none default, the one to chat with")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError(f"the chat_template in the tokenizer_config.json of {folder} is neither text nor a list of them")
    return template


def tokenizer_config(folder):
    path = folder / "tokenizer_config.json"
    return read_json(path, "fix or remove it") if path.is_file() else {}


def jinja_renderer(template, folder):
    """A function (messages, add_generation_prompt) -> text by template, rendered in a sandbox with what
    transformers' apply_chat_template gives a template; None without jinja2 3.1.6 or later, the first
    release without known ways out of the sandbox (chat templates come from the internet)."""
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
        its body between the GENERATION marks."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return GENERATION[0] + caller() + GENERATION[1]

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)  # Llama 3.1's date
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"cannot read the chat template of {folder} ({e})") from None
    config = tokenizer_config(folder)
    tokens = {name: token.get("content") if isinstance(token, dict) else token
              for name in TEMPLATE_TOKENS if (token := config.get(name)) is not None}

    def render(messages, add_generation_prompt=True):
        try:
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **tokens)
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # raise_exception, or a template that breaks
            raise UserError(f"the chat template of {folder} refuses the conversation ({e})") from None

    return render


def taught_to_answer(folder):
    """Whether the model of a run folder learnt to answer in a chat format: fine-tuned here on data with
    one (conversations, preference pairs), or started from a folder that ships its chat template. A
    folder written before train.py recorded its data counts as taught, since nothing says otherwise."""
    data = read_folder_config(folder).get("data")
    return not isinstance(data, dict) or "chat_format" in data or chat_template(Path(folder)) is not None
