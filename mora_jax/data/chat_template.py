"""A checkpoint's chat template (the jinja2 program in ``tokenizer_config.json``, ``chat_template.jinja``
or ``chat_template.json``), rendered as ``transformers``' ``apply_chat_template(..., tokenize=False)``
renders it: a sandboxed environment with ``trim_blocks`` / ``lstrip_blocks``, loop controls, the
``raise_exception`` / ``strftime_now`` globals, a ``tojson`` that does not escape HTML, and the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.

Templates are code from the checkpoint's author, so they run in jinja2's immutable sandbox (no
attribute access to Python internals, no mutation of the messages) and never with file access.
"""

from __future__ import annotations

import datetime
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


class ChatTemplateError(ValueError):
    """A chat template that is missing, malformed or fails on the given messages."""


def read_chat_template(directory: str | pathlib.Path, name: str = "default") -> str | None:
    """The chat template of a checkpoint directory, or None if it has none.

    Looks in ``chat_template.jinja`` (transformers >= 4.50 writes it there), then
    ``chat_template.json`` and ``tokenizer_config.json`` (``chat_template``: a string, or a list of
    ``{"name", "template"}`` of which ``name`` is taken).
    """
    directory = pathlib.Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    for fname in ("chat_template.json", "tokenizer_config.json"):
        path = directory / fname
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ChatTemplateError(f"{path} is not a JSON object ({e}); re-download it") from None
        if isinstance(template, list):
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if name not in by_name:
                raise ChatTemplateError(f"{path} has chat templates {sorted(by_name)}, none named {name!r}")
            template = by_name[name]
        if template is not None:
            if not isinstance(template, str):
                raise ChatTemplateError(f"{path}: chat_template must be a string, got {type(template).__name__}")
            return template
    return None


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled jinja2 template (cached); a ``ChatTemplateError`` on a syntax error."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("chat templates need jinja2 (pip install jinja2)") from e

    class _Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant tokens for HF): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e} (line {e.lineno})") from None


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str | None] | None = None, **variables) -> str:
    """``template`` applied to ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    ``add_generation_prompt`` appends the header of an assistant turn (what a model continues);
    ``special_tokens`` (``bos_token``, ``eos_token``, ...) and ``variables`` (e.g. ``tools``) are
    visible to the template.
    """
    import jinja2

    if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    context = {**(special_tokens or {}), **variables}
    try:
        return compile_template(template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None


__all__ = ["TEMPLATE_FILES", "ChatTemplateError", "compile_template", "read_chat_template", "render"]
