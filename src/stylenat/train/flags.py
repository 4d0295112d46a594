"""`stylenat train`'s options, made from the TrainConfig fields (one source of truth): a
``--field-name`` option per field, its value read by the field's type, its help the field's
docstring and range; the options that are more than one field written here by hand; and the
Markdown table of them all that docs/training.md holds (docs/gen_train_flags.py writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from stylenat._config import bounds, field_docs, field_types, parse_text
from stylenat.errors import UserError
from stylenat.models.config import parse_size
from stylenat.models.loading import read_official_meta
from stylenat.train.config import TrainConfig, get_train_preset


def assignments(items: list[str], flag: str) -> dict:
    """KEY=VALUE pairs; VALUE is parsed as JSON when it can be (numbers, lists, null), else kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# TrainConfig fields with a flag of the same name written by hand (it does more than set the field),
# and fields with no flag of their own, with what sets them.
TRAIN_FLAGS_BY_HAND = ("preset", "generator", "discriminator")
TRAIN_FIELDS_WITHOUT_FLAG = {
    "init_preset": "--preset together with --init (an official checkpoint's configuration by preset name)",
    "init_meta": "--meta META.json (an official checkpoint's configuration in official terms)",
    "init_sha256": "the trainer (the sha256 of the --init model file, checked on a restart)",
}
# Value names for --help where the field's type says less than its name.
_TRAIN_METAVARS = {"data": "PATH", "run_dir": "DIR", "init": "MODEL", "inception": "PATH", "metrics": "NAME,...",
                   "resolution": "N|WxH"}
# Fields whose text is not read by their type alone.
_TRAIN_READERS = {"resolution": lambda text, where: None if text.strip().lower() in ("none", "null") else parse_size(text, where)}


def train_flag_fields() -> list:
    """The TrainConfig fields whose ``--field-name`` flag is made from the field (its type and docstring)."""
    return [f for f in dataclasses.fields(TrainConfig)
            if f.name not in TRAIN_FLAGS_BY_HAND and f.name not in TRAIN_FIELDS_WITHOUT_FLAG]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(tp, name: str = "") -> str:
    """How a value of type ``tp`` reads in --help: N, X, {stop,skip}, X,X, NAME,..., N|none."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if name in _TRAIN_METAVARS:
        return _TRAIN_METAVARS[name] + ("|none" if type(None) in args else "")
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (typing.Union, types.UnionType):
        text = "|".join(_metavar(a, name) for a in args if a is not type(None))
        return text[:-1] + ",none}" if text.endswith("}") else text + "|none"
    if origin is tuple:
        return f"{_metavar(args[0])},..." if args[1:] == (Ellipsis,) else ",".join(_metavar(a) for a in args)
    return {int: "N", float: "X", bool: "{true,false}", dict: "JSON"}.get(tp) or name.upper() or "TEXT"


def train_flag_help(field) -> str:
    """A field flag's help: the field's docstring, then its range from :func:`stylenat._config.param`."""
    text, limits = field_docs(TrainConfig)[field.name], bounds(field.metadata)
    each = "each " if typing.get_origin(field_types(TrainConfig)[field.name]) is tuple else ""
    return f"{text} [{each}{limits}]" if limits else text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`stylenat train`'s options: ``--field-name`` for every field of :func:`train_flag_fields`
    (type, value name and help from the field), and those that are more than one field."""
    p.add_argument("--preset", metavar="NAME",
                   help="model and training preset: ffhq256, ffhq1024, church256, tiny, or a family sized by "
                        "--resolution or the data: ffhq (default), church; with --init it must describe the model "
                        "(default: none, the model's own config), and for an official .pt it is that checkpoint's "
                        "configuration")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint (other options "
                                                   "ignored but --steps)")
    hints = field_types(TrainConfig)
    for field in train_flag_fields():
        help = train_flag_help(field).replace("``", "").replace("%", "%%")
        if hints[field.name] is bool:
            p.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=help)
        else:  # kept as text: flag_values reads it by the field's type, so a bad value is one line
            p.add_argument(_flag(field.name), metavar=_metavar(hints[field.name], field.name), help=help)
        if field.name == "init":
            p.add_argument("--meta", metavar="META.json", help="configuration of an official --init checkpoint in "
                                                               "official terms (instead of --preset)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any TrainConfig field, e.g. d_lr=1e-3 (JSON value; the field's own option wins)")
    p.add_argument("--generator", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a GeneratorConfig field (JSON value)")
    p.add_argument("--discriminator", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a DiscriminatorConfig field (JSON value)")


def flag_values(args: argparse.Namespace) -> dict:
    """The fields whose flags were given, each read from its text by the field's type."""
    hints, out = field_types(TrainConfig), {}
    for field in train_flag_fields():
        value = getattr(args, field.name)
        if value is not None:
            read = _TRAIN_READERS.get(field.name, lambda text, where: parse_text(text, hints[field.name], where))
            out[field.name] = value if isinstance(value, bool) else read(value, _flag(field.name))
    return out


def _markdown_value(value) -> str:
    """A config value as it is typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(_markdown_value, value)) or '""'
    return str(value)  # (a size default would need size_text; none has one)


def train_flags_markdown() -> str:
    """The Markdown table of `stylenat train`'s options: flag, value, the default of the ffhq
    preset (no --preset) and of tiny, and the help text (docs/training.md holds it; written by
    docs/gen_train_flags.py)."""
    parser = argparse.ArgumentParser(prog="stylenat train")
    add_train_arguments(parser)
    presets = [get_train_preset("ffhq"), get_train_preset("tiny")]
    fields = {f.name for f in train_flag_fields()}

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    rows = ["| option | value | default (ffhq) | tiny | what it does |", "|---|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        value = f"`{cell(action.metavar)}`" if action.metavar else ""
        defaults = [f"`{cell(_markdown_value(getattr(t, action.dest)))}`" if action.dest in fields else "" for t in presets]
        rows.append(f"| {flags} | {value} | {' | '.join(defaults)} | {cell(action.help.replace('%%', '%'))} |")
    return "\n".join(rows) + "\n"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a parsed `stylenat train` command line (not --resume): the preset's
    config, then --set, then the fields' own options, then what --preset/--meta say about --init."""
    given = flag_values(args)
    if not given.get("run_dir"):
        raise UserError("--run-dir is required (or --resume DIR to continue a run)")
    init = given.get("init")
    if args.meta and not init:
        raise UserError("--meta describes an official checkpoint given with --init; add --init CKPT.pt")
    values = {**assignments(args.set, "--set"), **given}
    if args.meta:
        values["init_meta"] = read_official_meta(args.meta)
    elif init and args.preset:
        values["init_preset"] = args.preset
    values["generator"] = assignments(args.generator, "--generator")
    values["discriminator"] = assignments(args.discriminator, "--discriminator")
    if init and not args.preset:  # the model comes from --init; config.json must not name a preset for it
        values.setdefault("preset", None)
    return get_train_preset(args.preset or "ffhq").replace(**values)
