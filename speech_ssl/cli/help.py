"""``speech-ssl <command> --help``: every configuration key in one line, with its current value.

The descriptions come from the typed ``Config`` dataclasses' docstrings, which document their fields as
``name: description`` entries (several names may share one: ``a / b: ...``; ``mask_*`` matches by
pattern; an entry may continue on indented lines or share a line after a sentence's end). Keeping the
documentation in the dataclass means the help, the code and the schema cannot drift apart:
``undescribed_keys`` lists any key without a description, and a test keeps that list empty.

The values shown are the composed configuration (dataclass defaults < ``conf/<command>/config.yaml`` <
recipe < the user's overrides), so ``speech-ssl pretrain recipe=base trainer.optim.lr=1e-4 --help`` shows
what that command line would run with.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import json
import re
import shutil
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional, get_args, get_origin

from speech_ssl.cli.hydra_app import CONF_DIR, compose_config, schema_dict
from speech_ssl.stages import COMMANDS

# The text fits the terminal (100 columns when it is no terminal, e.g. piped), at least 80 columns; wider
# terminals show more of each description, up to MAX_WIDTH.
MIN_WIDTH, DEFAULT_WIDTH, MAX_WIDTH = 80, 100, 160
# Descriptions start at this column at most; longer key=value texts push their description further right.
MAX_KEY_COLUMN = 36
# Strings made only of these characters are shown bare; others quoted, as a shell and Hydra would need.
_BARE = re.compile(r"[A-Za-z0-9_.,/:@+*?=-]+")
REQUIRED = "???"

# An entry head: one or more field names (``*`` allowed) separated by `` / ``, then a colon and a space.
_NAME = r"[A-Za-z_][A-Za-z0-9_*]*"
_HEAD = re.compile(rf"(?P<names>{_NAME}(?:\s*/\s*{_NAME})*):(?=\s)")
# An entry that only points elsewhere ("x / y: see below.") describes nothing by itself.
_DEFERS = re.compile(r"(?i)see (below|above)\.?")


@dataclass(frozen=True)
class HelpLine:
    """One key of the help: its dotted name, its current value as typed on a command line, what it does.
    ``section`` marks a nested group (``trainer``), printed as a heading above its keys."""

    key: str
    value: str
    description: str
    section: bool = False


# ----------------------------------------------------------------------------------------------------
# docstrings -> descriptions


def _own_docstring(cls: type) -> str:
    """The class's own docstring, or "" for the signature dataclasses make up when there is none."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def _head_starts(text: str, field_names: list[str]) -> list[re.Match]:
    """Entry heads in ``text`` naming only real fields, at a line's start or after a sentence's end (so
    that prose such as "lm_weight applies only with it" never starts an entry)."""
    heads = []
    for match in _HEAD.finditer(text):
        before = text[: match.start()]
        at_line_start = before.rpartition("\n")[2].strip() == ""
        after_sentence = re.search(r"[.;]\s+$", before) is not None
        names = _split_names(match.group("names"))
        if (at_line_start or after_sentence) and all(_expand(n, field_names) for n in names):
            heads.append(match)
    return heads


def _split_names(names: str) -> list[str]:
    return [n.strip() for n in names.split("/")]


def _expand(pattern: str, field_names: list[str]) -> list[str]:
    return [f for f in field_names if fnmatch.fnmatchcase(f, pattern)]


def _one_line(text: str) -> str:
    """Whitespace collapsed, reStructuredText literals (````x````) as plain `x`."""
    return " ".join(text.replace("``", "`").split())


def parse_docstring(doc: str, field_names: list[str]) -> tuple[str, dict[str, str]]:
    """(the preamble, {field: description}) of a docstring in the ``name: description`` style.

    An entry runs to the next head or to a blank line (a paragraph after the entries is not part of the
    last one)."""
    heads = _head_starts(doc, field_names)
    preamble = _one_line(doc[: heads[0].start()] if heads else doc)
    found: dict[str, str] = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(doc)
        body = re.split(r"\n\s*\n", doc[head.end(): end])[0]
        description = _one_line(body)
        for pattern in _split_names(head.group("names")):
            for name in _expand(pattern, field_names):
                found.setdefault(name, description)
    return preamble, found


def class_summary(cls: type) -> str:
    """The first sentence of the nearest docstring preamble in ``cls``'s MRO ("" when none has one)."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        preamble, _ = parse_docstring(_own_docstring(klass), [f.name for f in dataclasses.fields(cls)])
        if preamble:
            return _first_sentence(preamble)
    return ""


def field_descriptions(cls: type) -> dict[str, str]:
    """{field: description} of dataclass ``cls``, its own docstring first, then its bases' (a subclass
    inherits what its base documents)."""
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            _, found = parse_docstring(_own_docstring(klass), names)
            for name, text in found.items():
                if not _DEFERS.fullmatch(text):  # "see below": the base class describes it
                    out.setdefault(name, text)
    return out


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text


# ----------------------------------------------------------------------------------------------------
# the configuration as lines


def _dataclass_of(hint: Any) -> Optional[type]:
    """The dataclass a field holds (through Optional), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is typing.Union and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _stage_configs() -> dict[type, str]:
    """Other commands' Config classes, by class: ``run`` nests whole stages (``pretrain.*``)."""
    return {command.load().Config: name for name, command in COMMANDS.items()}


def format_value(value: Any) -> str:
    """A value as it would be typed on the command line (``null``, ``[a, b]``, ``{}``, ``''``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and (value == REQUIRED or _BARE.fullmatch(value)):
        return value
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def config_lines(cls: type, values: Any, prefix: str = "", changed_only: Optional[dict] = None) -> Iterator[HelpLine]:
    """One HelpLine per key of dataclass ``cls`` (nested dataclasses as sections, then their keys), with
    the value from the composed ``values``. ``changed_only``: the defaults to compare with; keys equal
    to them are left out (the stage settings of ``run``, which their own commands' help describes)."""
    hints = typing.get_type_hints(cls)
    descriptions = field_descriptions(cls)
    stages = _stage_configs()
    values = values if isinstance(values, dict) else {}
    leaves, sections = [], []
    for field in dataclasses.fields(cls):
        nested = _dataclass_of(hints[field.name])
        (sections if nested is not None else leaves).append((field, nested))
    for field, _ in leaves:
        value = values.get(field.name, REQUIRED)
        if changed_only is not None and value == changed_only.get(field.name, REQUIRED):
            continue
        yield HelpLine(prefix + field.name, format_value(value), descriptions.get(field.name, ""))
    for field, nested in sections:
        key = prefix + field.name
        description = descriptions.get(field.name) or class_summary(nested)
        value = values.get(field.name, {})
        defaults = None if changed_only is None else changed_only.get(field.name, {})
        if nested in stages and changed_only is None and prefix == "":
            # a whole stage inside a pipeline: its own --help describes its keys; list what is set here
            defaults = schema_dict(cls).get(field.name, {})
            body = list(config_lines(nested, value, key + ".", defaults))
            description = (f"the {stages[nested]} stage's keys (`speech-ssl {stages[nested]} --help`); "
                           + ("set here:" if body else "all at their defaults"))
            yield HelpLine(key, "", description, section=True)
            yield from body
            continue
        body = list(config_lines(nested, value, key + ".", defaults))
        if changed_only is not None and not body:
            continue
        yield HelpLine(key, "", description, section=True)
        yield from body


def all_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every key of ``cls`` (sections included, nested stages in full) with its description."""
    hints = typing.get_type_hints(cls)
    descriptions = field_descriptions(cls)
    for field in dataclasses.fields(cls):
        nested = _dataclass_of(hints[field.name])
        description = descriptions.get(field.name, "")
        if nested is not None:
            yield prefix + field.name, description or class_summary(nested)
            yield from all_keys(nested, prefix + field.name + ".")
        else:
            yield prefix + field.name, description


def undescribed_keys(name: str) -> list[str]:
    """Keys of command ``name`` whose dataclass docstrings say nothing about them (a test keeps this empty)."""
    return [key for key, description in all_keys(COMMANDS[name].load().Config) if not description.strip()]


# ----------------------------------------------------------------------------------------------------
# presets and recipes


def recipes(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / name / "recipe").glob("*.yaml"))


def default_recipe(name: str) -> Optional[str]:
    """The recipe ``conf/<name>/config.yaml`` picks in its defaults list (``- recipe: cpu_tiny``)."""
    path = CONF_DIR / name / "config.yaml"
    match = re.search(r"^\s*-\s*recipe:\s*(\S+)\s*$", path.read_text(), re.MULTILINE) if path.exists() else None
    return match.group(1) if match else None


def _chosen_recipe(name: str, overrides: list[str]) -> Optional[str]:
    chosen = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("recipe=")]
    return chosen[-1] if chosen else default_recipe(name)


def preset_summaries() -> list[str]:
    """``name (front end, layers x width)`` for each model preset."""
    from speech_ssl.models.presets import PRESETS

    return [f"{name} ({cfg.frontend} front end, {cfg.num_layers} x {cfg.embed_dim})" for name, cfg in PRESETS.items()]


def _takes_a_model_preset(lines: list[HelpLine]) -> bool:
    return any(line.key == "model" or line.key.endswith(".model") for line in lines if not line.section)


# ----------------------------------------------------------------------------------------------------
# layout


def _width() -> int:
    return max(MIN_WIDTH, min(MAX_WIDTH, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns))


def _fit(text: str, room: int) -> str:
    """``text`` cut at a word boundary to ``room`` characters, with an ellipsis when cut."""
    if len(text) <= room:
        return text
    cut = text[: room - 1].rsplit(" ", 1)[0].rstrip(",;:( ")
    return cut + "…"


def _wrap_list(label: str, items: list[str], width: int) -> list[str]:
    """``label: a, b, c`` wrapped under the label's indentation."""
    import textwrap

    return textwrap.wrap(", ".join(items), width=width, initial_indent=f"{label}: ",
                         subsequent_indent=" " * 4, break_on_hyphens=False)


def _sections(lines: list[HelpLine]) -> list[list[HelpLine]]:
    """The lines cut before each section heading."""
    groups: list[list[HelpLine]] = [[]]
    for line in lines:
        if line.section:
            groups.append([])
        groups[-1].append(line)
    return [group for group in groups if group]


def render_lines(lines: list[HelpLine], width: int) -> list[str]:
    """Sections as headings with a blank line before; keys as ``key=value  description``, the
    descriptions of a section in one column."""
    out = []
    for group in _sections(lines):
        assignments = [len(f"{line.key}={line.value}") for line in group if not line.section]
        column = 2 + min(MAX_KEY_COLUMN, max(assignments, default=0)) + 2
        for line in group:
            if line.section:
                heading = f"  {line.key}.*"
                out += ["", f"{heading}  {_fit(line.description, width - len(heading) - 2)}".rstrip()]
                continue
            assignment = f"  {line.key}={line.value}"
            start = max(column, len(assignment) + 2)
            room = width - start
            description = _fit(line.description, room) if room >= 20 else ""
            out.append(f"{assignment.ljust(start)}{description}".rstrip())
    return out


def _wrap_command(line: str, width: int) -> list[str]:
    """An indented example line as it is, or, wider than ``width``, cut at spaces into shell continuation
    lines (`` \\``), so a command line copied from the help still runs."""
    import textwrap

    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    parts = textwrap.wrap(line.strip(), width - len(indent) - 6, break_long_words=False, break_on_hyphens=False)
    continued = [part + " \\" for part in parts[:-1]] + parts[-1:]
    return [indent + ("    " if i else "") + part for i, part in enumerate(continued)]


def refill(doc: str, width: int) -> list[str]:
    """Prose paragraphs of a docstring re-wrapped to ``width``; bullet items (``*``/``-``) wrapped under
    their bullet; indented blocks (command lines, tables) kept as written."""
    import textwrap

    out: list[str] = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc).replace("``", "`")):
        lines = block.splitlines()
        if lines and lines[0][:1].isspace():
            for line in lines:
                out += _wrap_command(line, width)
        elif lines and re.match(r"[*-] ", lines[0]):
            items = re.split(r"\n(?=[*-] )", block)
            for item in items:
                out += textwrap.wrap(" ".join(item.split()), width, subsequent_indent="  ", break_on_hyphens=False)
        else:
            out += textwrap.wrap(" ".join(block.split()), width, break_on_hyphens=False)
        out.append("")
    return out[:-1]


def command_help(name: str, overrides: list[str]) -> str:
    """The whole ``--help`` text of command ``name`` given the (checked) ``overrides``."""
    from omegaconf import OmegaConf

    module = COMMANDS[name].load()
    cfg = compose_config(name, list(overrides))
    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # an interpolation that only resolves at run time: show it as written
        values = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    lines = list(config_lines(module.Config, values))
    width = _width()
    text = [f"usage: speech-ssl {name} [key=value ...] [--help]", "", *refill(module.__doc__ or "", width), ""]
    names = recipes(name)
    if names:
        chosen = _chosen_recipe(name, overrides)
        shown = [f"{r} (in use)" if r == chosen else r for r in names]
        text += _wrap_list(f"recipes (recipe=<name>, conf/{name}/recipe/)", shown, width)
    if _takes_a_model_preset(lines):
        text += _wrap_list("model presets (model=<name>)", preset_summaries(), width)
    for key, _ in all_keys(module.Config):
        if key == "init" or key.endswith(".init"):
            model = key[: -len("init")] + "model"
            text.append(f"{key}=none: no pretrained checkpoint; the {model} preset is trained from scratch.")
    if text[-1]:
        text.append("")
    text += [f"configuration (conf/{name}/config.yaml): each key=value as this command line would run it",
             f"({REQUIRED}: required; descriptions cut to the terminal's width, COLUMNS={MAX_WIDTH} shows more):"]
    text += render_lines(lines, width)
    return "\n".join(text).rstrip() + "\n"
