"""
Chat formats: a conversation, a list of {"role": "system" | "user" | "assistant", "content": text}, as
the token ids an instruct model expects, ending in the header of the assistant's next message.

A checkpoint folder's own chat template (chat_template.jinja, else tokenizer_config.json's
chat_template) is rendered as transformers' apply_chat_template(messages, add_generation_prompt=True)
renders it, with jinja2 in a sandbox (templates come from the internet). A folder without one, or a
machine without jinja2, falls back on the Llama 3 or ChatML format that the tokenizer's special
tokens show.
"""

import sys
from datetime import datetime

from corpus import UserError
from runs import read_json

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
            raise UserError(f"--chat needs a chat template, and {folder} has none (no chat_template.jinja, no "
                           f"chat_template in tokenizer_config.json) nor the special tokens of {names} to fall back on")
        if not built_in:
            raise UserError(f"--chat needs jinja2 3.1.6 or later (pip install -e \".[chat]\") to read the chat template "
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
        raise UserError(f"cannot read the chat template of {folder} ({e})") from None
    config = tokenizer_config(folder)
    tokens = {name: token.get("content") if isinstance(token, dict) else token
              for name in TEMPLATE_TOKENS if (token := config.get(name)) is not None}

    def render(messages):
        try:
            return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True, **tokens)
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # raise_exception, or a template that breaks
            raise UserError(f"the chat template of {folder} refuses the conversation ({e})") from None

    return render

