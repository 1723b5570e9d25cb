"""Chat templates rendered as `transformers` renders them, and assistant-only loss masks.

    template = load_chat_template("ckpt/SmolLM2-135M-Instruct")     # or a .gguf file
    text = render(template, messages, add_generation_prompt=True, special_tokens={"bos_token": "<s>", ...})
    ids, mask = tokenize_conversation(tok, template, messages)       # mask 1 on assistant-turn tokens

Where the template comes from, in transformers' order: `chat_template.jinja` beside the tokenizer, else
`tokenizer_config.json`'s `chat_template` (a string, or a list of {"name", "template"}: the "default" one),
else a GGUF's `tokenizer.chat_template`.

Rendering: jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols
extension; globals `raise_exception` (raises TemplateError with the template's message) and `strftime_now`;
the `tojson` filter with transformers' defaults (ensure_ascii=False); variables `messages`,
`add_generation_prompt`, `tools`, `documents`, the special tokens (`bos_token`, `eos_token`, ...) and any
extra keyword. A `{% generation %}` block (transformers' assistant-mask marker) renders its body.

Assistant masks: the conversation is rendered once per prefix; assistant turn i covers the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) (its content and end-of-turn
tokens, not the role header). Tokens whose characters start inside such a span get mask 1. A template
whose renderings are not prefixes of each other (e.g. one that drops earlier reasoning) is refused.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that cannot be used, or one that raised via raise_exception."""


def _environment() -> Any:
    try:
        import jinja2  # (the hf / gguf extras)
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'forgetting[hf]'") from None

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers marks assistant text so)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:  # (the name templates call it with)
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str | None] | None = None, tools: Any = None, documents: Any = None,
           **kwargs: Any) -> str:
    """The template rendered for `messages` (see the module doc)."""
    import jinja2

    env = _environment()
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, **dict(special_tokens or {}), **kwargs)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(f"chat template: {err}") from None


def load_chat_template(path: str | Path, name: str = "default") -> str:
    """The chat template of a checkpoint directory, tokenizer_config.json or .gguf file (module doc)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from forgetting.formats import gguf_checkpoint

        template = gguf_checkpoint.gguf_chat_template(path)
        if not template:
            raise ChatTemplateError(f"{path} has no tokenizer.chat_template")
        return template
    directory = path.parent if path.is_file() else path
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config_file = path if path.is_file() else directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        by_name = {t.get("name"): t.get("template") for t in template}
        if name not in by_name:
            raise ChatTemplateError(f"{config_file}: no chat template named {name!r} (has {sorted(by_name)})")
        template = by_name[name]
    if not template:
        raise ChatTemplateError(f"no chat template in {directory} (no chat_template.jinja, no chat_template in "
                                "tokenizer_config.json)")
    return template


def special_tokens_of(path: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... names as the template sees them (tokenizer_config.json, else GGUF ids)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from forgetting.formats import gguf_checkpoint

        g = gguf_checkpoint.open_gguf(path)
        tokens = g.require("tokenizer.ggml.tokens")
        out = {}
        for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                           ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            i = g.get(f"tokenizer.ggml.{field}")
            if i is not None and 0 <= int(i) < len(tokens):
                out[key] = tokens[int(i)]
        return out
    directory = path.parent if path.is_file() else path
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is not None:
            out[key] = value
    return out


def assistant_spans(template: str, messages: Sequence[Mapping[str, Any]], **render_kwargs: Any
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(full rendering, [(start, end) character spans of the assistant turns])."""
    full = render(template, messages, **render_kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(template, messages[:i], add_generation_prompt=True, **render_kwargs)
        through = render(template, messages[:i + 1], **render_kwargs)
        if not (full.startswith(through) and through.startswith(before)):
            raise ChatTemplateError("the chat template's rendering of a conversation prefix is not a prefix of "
                                    f"the full rendering (at message {i}); assistant masks need prefix renderings")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tok: Any, template: str, messages: Sequence[Mapping[str, Any]],
                          special_tokens: Mapping[str, str] | None = None) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 0/1 mask: 1 on assistant-turn tokens). Special-token text
    in the rendering becomes special ids. Needs a `tokenizers`-backed tokenizer (character offsets)."""
    if not hasattr(tok, "tokenizer"):
        raise ChatTemplateError("chat tokenization needs a tokenizer.json or GGUF tokenizer (tokenizers library)")
    if not messages:
        raise ChatTemplateError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"message {i} needs 'role' and 'content' fields, got {m!r}")
    text, spans = assistant_spans(template, messages, special_tokens=special_tokens)
    encoding = tok.tokenizer.encode(text, add_special_tokens=False)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoding.offsets]
    return list(encoding.ids), mask
