"""A checkpoint's chat template (the jinja2 program in ``tokenizer_config.json``, ``chat_template.jinja``
or ``chat_template.json``), rendered as ``transformers``' ``apply_chat_template(..., tokenize=False)``
renders it: a sandboxed environment with ``trim_blocks`` / ``lstrip_blocks``, loop controls, the
``raise_exception`` / ``strftime_now`` globals, a ``tojson`` that does not escape HTML, and the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.

Templates are code from the checkpoint's author, so they run in jinja2's immutable sandbox (no
attribute access to Python internals, no mutation of the messages) and never with file access.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import time
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
    found = locate_chat_template(directory, name)
    return None if found is None else found[0]


def locate_chat_template(directory: str | pathlib.Path, name: str = "default") -> tuple[str, pathlib.Path] | None:
    """``(template, the file it is in)`` as :func:`read_chat_template` finds it, or None."""
    directory = pathlib.Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(), directory / "chat_template.jinja"
    for fname in ("chat_template.json", "tokenizer_config.json"):
        path = directory / fname
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ChatTemplateError(f"{path} is not a JSON object ({e}); re-download it") from None
        except RecursionError:
            raise ChatTemplateError(f"{path} is nested too deeply to read as JSON; re-download it") from None
        if isinstance(template, list):
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if name not in by_name:
                raise ChatTemplateError(f"{path} has chat templates {sorted(map(str, by_name))}, none named {name!r}")
            template = by_name[name]
        if template is not None:
            if not isinstance(template, str):
                raise ChatTemplateError(f"{path}: chat_template must be a string, got {type(template).__name__}")
            return template, path
    return None


# ---- Limits -------------------------------------------------------------------------------------
# A chat template formats a few messages in well under a millisecond; these bounds only stop a
# broken or hostile one (nested loops over large ranges, strings doubled until memory runs out).
TIME_LIMIT_S = 5.0  # wall-clock seconds for one render
MAX_OUTPUT_CHARS = 1_000_000  # characters a render may produce beyond 4x the messages' own text
MAX_RANGE = 10_000  # items of one range() (jinja2's sandbox allows 100 000)
MAX_RANGE_ITEMS = 1_000_000  # items of all range() calls of one render together


class _Exceeded(BaseException):
    """Raised inside a render that went past a limit (a BaseException, so nothing in jinja2 swallows it)."""


@dataclasses.dataclass
class _Budget:
    deadline: float
    time_limit_s: float
    max_chars: int
    range_items: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Exceeded(f"it ran longer than {self.time_limit_s:g} s")

    def size(self, what: str, n: int) -> None:
        if n > self.max_chars:
            raise _Exceeded(f"{what} would be {n:,} long, more than the {self.max_chars:,} a render may produce")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _size_of(value) -> int | None:
    """Characters (strings) or items (lists, tuples; strings in them by their length) of a value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(len(x) if isinstance(x, str) else 1 for x in value)
    return None


def _bounded_range(*args):
    numbers = range(*args)
    budget = _BUDGET.get()
    if len(numbers) > MAX_RANGE:
        raise _Exceeded(f"range{args} has {len(numbers):,} items, more than the {MAX_RANGE:,} allowed")
    if budget is not None:
        budget.tick()
        budget.range_items += len(numbers)
        if budget.range_items > MAX_RANGE_ITEMS:
            raise _Exceeded(f"its range() calls made more than {MAX_RANGE_ITEMS:,} items")
    return numbers


def _power(left, right):
    if isinstance(left, int) and isinstance(right, int) and not isinstance(right, bool) and right > 0:
        if abs(left) > 1 and right * max(abs(left).bit_length(), 1) > 4096:
            raise _Exceeded(f"{left} ** {right} is a number of more than 4096 bits")
    return left**right


@functools.lru_cache(maxsize=1)
def _environment_class():
    """The sandbox of every chat template: jinja2's immutable sandbox, with every loop iteration, call,
    attribute and item access, ``+``, ``*``, ``**`` and ``~`` checked against the render's time and size
    budget, ``range()`` bounded, and no other template files (include, import, extends). The checks
    are in the template's own code, so they hold in any thread."""
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class NoFiles(jinja2.BaseLoader):
        def get_source(self, environment, template):
            raise jinja2.exceptions.TemplateNotFound(
                f"{template} (a chat template is one self-contained template: it cannot include, import or extend "
                "other templates or files)")

    class Generator(CodeGenerator):
        def visit_For(self, node, frame):  # every loop iterates through the budget (a check per item)
            bounded = jinja2.nodes.EnvironmentAttribute("bounded_iter", lineno=node.lineno)
            if not (isinstance(node.iter, jinja2.nodes.Call) and node.iter.node == bounded):
                node.iter = jinja2.nodes.Call(bounded, [node.iter], [], None, None, lineno=node.lineno)
            super().visit_For(node, frame)

        def visit_Concat(self, node, frame):  # `a ~ b`: joined through the budget
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**"})
        code_generator_class = Generator

        def __init__(self, *args, **kwargs):
            super().__init__(*args, loader=NoFiles(), **kwargs)
            self.globals["range"] = _bounded_range
            self.binop_table["**"] = _power

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            _tick()
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _tick()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            budget = _BUDGET.get()
            if budget is not None:
                budget.tick()
                sizes = (_size_of(left), _size_of(right))
                if operator == "+" and None not in sizes and type(left) is type(right):
                    budget.size(f"{type(left).__name__} + {type(right).__name__}", sum(sizes))
                elif operator == "*":
                    for value, size, count in ((left, sizes[0], right), (right, sizes[1], left)):
                        if size is not None and isinstance(count, int) and not isinstance(count, bool):
                            budget.size(f"a {type(value).__name__} repeated {count:,} times", size * count)
            return super().call_binop(context, operator, left, right)

        def bounded_iter(self, iterable):
            budget = _BUDGET.get()
            if budget is None:
                return iterable

            def items():
                for item in iterable:
                    budget.tick()
                    yield item

            return items()

        def bounded_join(self, parts):
            parts = [str(p) for p in parts]
            budget = _BUDGET.get()
            if budget is not None:
                budget.tick()
                budget.size("a string joined with ~", sum(map(len, parts)))
            return "".join(parts)

    return BoundedSandbox


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled jinja2 template (cached); a ``ChatTemplateError`` on a syntax error."""
    try:
        import jinja2
        import jinja2.ext
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

    env = _environment_class()(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e} (line {e.lineno})") from None
    except RecursionError:
        raise ChatTemplateError("the chat template is nested too deeply to parse") from None


def _text_size(value, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth < 4 and isinstance(value, Mapping):
        return sum(_text_size(v, depth + 1) for v in value.values())
    if depth < 4 and isinstance(value, (list, tuple)):
        return sum(_text_size(v, depth + 1) for v in value)
    return 0


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str | None] | None = None, source: str | os.PathLike | None = None,
           time_limit_s: float = TIME_LIMIT_S, **variables) -> str:
    """``template`` applied to ``messages`` (``[{"role": ..., "content": ...}, ...]``).

    ``add_generation_prompt`` appends the header of an assistant turn (what a model continues);
    ``special_tokens`` (``bos_token``, ``eos_token``, ...) and ``variables`` (e.g. ``tools``) are
    visible to the template; ``source`` (the file the template came from) names it in errors.

    The render is bounded: at most ``time_limit_s`` seconds, :data:`MAX_OUTPUT_CHARS` characters beyond
    four times the messages' own text, :data:`MAX_RANGE` items per ``range()``; past a bound it stops with
    a :class:`ChatTemplateError`.
    """
    import jinja2

    where = f"the chat template in {source}" if source else "the chat template"
    if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    context = {**(special_tokens or {}), **variables}
    max_chars = MAX_OUTPUT_CHARS + 4 * (_text_size(list(messages)) + _text_size(context))
    budget = _Budget(deadline=time.monotonic() + time_limit_s, time_limit_s=time_limit_s, max_chars=max_chars)
    token = _BUDGET.set(budget)
    try:
        compiled = compile_template(template)
        pieces, length = [], 0
        for piece in compiled.generate(messages=[dict(m) for m in messages],
                                       add_generation_prompt=add_generation_prompt, **context):
            length += len(piece)
            budget.size("the rendered text", length)
            budget.tick()
            pieces.append(piece)
        return "".join(pieces)
    except _Exceeded as e:
        raise ChatTemplateError(
            f"{where} was stopped: {e}. A chat template formats a few messages in milliseconds; this one is "
            "broken or hostile: use the model's original tokenizer files") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{where} failed on these messages: {e}") from None
    except RecursionError:
        raise ChatTemplateError(f"{where} failed on these messages: it recursed too deeply") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:  # the template's own code
        raise ChatTemplateError(f"{where} failed on these messages: {type(e).__name__}: {e}") from None
    finally:
        _BUDGET.reset(token)


__all__ = ["MAX_OUTPUT_CHARS", "MAX_RANGE", "TEMPLATE_FILES", "TIME_LIMIT_S", "ChatTemplateError", "compile_template",
           "locate_chat_template", "read_chat_template", "render"]
