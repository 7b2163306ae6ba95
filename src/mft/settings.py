"""Typed settings: a dataclass filled from a YAML file and `--key=value` overrides, or from argparse flags that
are generated from the same dataclass. One parser for every command (`train`, `apply`, `eval`, `demo`).

    values = read_settings(TrainConfig, "run.yaml", ["--learning_rate=1e-5", "--masked_layers", "4 5 6 7"])
    cfg = TrainConfig(**values)            # the Python API: the dataclass coerces its own fields (coerce_fields)

    parser = argparse.ArgumentParser()
    add_arguments(parser, ApplyOptions)    # --output_dir ... (help from each field's metadata["help"])
    cfg = ApplyOptions(**vars(parse_both_spellings(parser, argv)))

The type of a field is its annotation (`bool`, `int`, `float`, `str`, `list[str]`, `list[int]` (layer indices),
`dict`, `int | str` (checkpointing steps); `| None` allows null). Values from YAML keep their YAML type; values
from the command line are read as YAML except for string fields (`--output_dir=on` stays "on"), and a wrong
type is refused naming the key, the expected type and the value.

Spellings: every flag is accepted as `--snake_case` (the original's published flags: apply_masks.py,
open-instruct's finetune.py) and as `--kebab-case`; `--help` shows the command's own spelling once.

Field metadata keys: `help` (the flag's help), `flags` (extra option strings, e.g. published aliases), `choices`,
`required`, `metavar`, `split` (list[str]: the separators of a string value, a regular expression; default
whitespace), `action` (`append` for repeatable flags), `spelling` ("kebab" or "snake": the one --help shows).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import re
from dataclasses import fields

from mft.errors import MftError

logger = logging.getLogger(__name__)

_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False,
               "on": True, "off": False}
_KIND_NAMES = {"bool": "a boolean (true/false)", "int": "an integer", "float": "a number", "str": "a string",
               "list[str]": "a list of strings", "list[int]": "layer indices like \"4 5 6 7\"",
               "dict": "a mapping {key: value}", "int|str": "a positive integer, 'epoch' or 'epoch/K'"}


def kind_of(f) -> str:
    """Field annotation -> one of the kinds above, plus '?' when None is allowed."""
    parts = [p.strip() for p in str(f.type).split("|")]
    optional = "None" in parts
    base = "|".join(p for p in parts if p != "None")
    return base + ("?" if optional else "")


def coerce(key: str, value, kind: str, split: str = r"\s+"):
    """`value` as a field of `kind` (see kind_of), or MftError naming key, expected type and value."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise MftError(f"{key} cannot be null; expected {_KIND_NAMES[kind]}")

    def bad():
        return MftError(f"{key}: expected {_KIND_NAMES[kind]}, got {value!r} ({type(value).__name__})")

    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise bad()
    if kind == "int":
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        try:
            number = float(value) if isinstance(value, (float, str)) else None
        except ValueError:
            raise bad() from None
        if number is None or not number.is_integer():
            raise bad()
        return int(number)
    if kind == "float":
        if isinstance(value, bool):
            raise bad()
        if not isinstance(value, (int, float, str)):
            raise bad()
        try:
            return float(value)
        except ValueError:
            raise bad() from None
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if kind == "list[str]":
        if isinstance(value, str):
            value = [v for v in re.split(split, value.strip()) if v]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return [str(v) for v in value]
        raise bad()
    if kind == "list[int]":
        if isinstance(value, (bool, dict, float)):
            raise bad()
        from mft.masking.config import parse_layers

        return parse_layers(value)
    if kind == "dict":
        if isinstance(value, str) and value.strip().startswith("{"):
            import yaml

            value = yaml.safe_load(value)
        if isinstance(value, dict):
            return dict(value)
        raise bad()
    if kind == "int|str":  # checkpointing_steps
        if isinstance(value, str) and value.strip().lower() == "epoch":
            return "epoch"
        if isinstance(value, str) and re.fullmatch(r"epoch/[1-9]\d*", value.strip().lower()):
            return value.strip().lower()
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    raise AssertionError(f"unhandled kind {kind} for {key}")


def coerce_fields(obj) -> None:
    """Coerce every field of the dataclass instance `obj` to its annotated type in place (for __post_init__)."""
    for f in fields(obj):
        setattr(obj, f.name, coerce(f.name, getattr(obj, f.name), kind_of(f), f.metadata.get("split", r"\s+")))


def parse_value(raw: str, kind: str):
    """A command-line value: YAML for everything but strings (kept raw, except null/~)."""
    import yaml

    if kind.rstrip("?") == "str":
        return None if raw in ("null", "~", "None") and kind.endswith("?") else raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def parse_overrides(args: list[str], kinds: dict[str, str], aliases: dict[str, str] | None = None) -> dict:
    """`["--lr=1", "--use_lora", "--masked_layers", "4 5", "seed=3"]` -> {key: value}, values read as YAML
    (raw strings kept for string keys, so `--output_dir=on` stays "on"). `kinds`: {key: kind} (see kind_of); a
    key of kind bool alone means true. `aliases`: {other name: key}. `--kebab-case` reads as `--snake_case`."""
    aliases = aliases or {}
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                kind = kinds.get(aliases.get(key, key), "")
                takes_next = i < len(args) and not args[i].startswith("--")
                if kind == "bool" and not (takes_next and args[i].lower() in _BOOL_WORDS):
                    out[key] = True  # a flag alone
                    continue
                if not takes_next:
                    raise MftError(f"--{key} needs a value: --{key}=VALUE")
                raw = args[i]
                i += 1
        elif "=" in arg and re.fullmatch(r"[A-Za-z_][\w-]*", arg.partition("=")[0]):
            key, _, raw = arg.partition("=")
            key = key.replace("-", "_")
        else:
            raise MftError(f"unexpected argument {arg!r}; settings are written --key=value (or key=value)")
        out[key] = parse_value(raw, kinds.get(aliases.get(key, key), ""))
    return out


def merge(values: dict, new: dict, where: str, cls, aliases: dict[str, str] | None = None,
          unsupported: dict | None = None, hint: str = "") -> None:
    """Add `new` (one source) to `values`: canonical names, unknown keys and unsupported values refused.

    `unsupported`: {key: (values that ask for nothing missing, or None for any value; what to do instead)}:
    such a key is accepted at those values (logged, then dropped) and an error otherwise. `hint`: the end of
    the unknown-key message when no known key is close."""
    aliases, unsupported = aliases or {}, unsupported or {}
    known = {f.name for f in fields(cls)}
    seen: dict = {}
    for key, value in new.items():
        key = str(key).replace("-", "_")
        if key in unsupported:
            harmless, instead = unsupported[key]
            if harmless is not None and value not in harmless:
                raise MftError(f"{key}: {value!r} is not supported ({where}); {instead}")
            logger.info("ignoring %s=%r (%s): accepted for compatibility, has no effect", key, value, where)
            continue
        name = aliases.get(key, key)
        if name not in known:
            candidates = sorted(known | set(aliases) | set(unsupported))
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            raise MftError(f"unknown setting {key!r} {where}" + (f"; did you mean {close[0]!r}?" if close else hint))
        if name in seen and seen[name][1] != value:
            raise MftError(f"{seen[name][0]} and {key} are the same setting ({where}) and disagree: "
                           f"{seen[name][1]!r} vs {value!r}")
        seen[name] = (key, value)
        values[name] = value


def read_settings(cls, path: str | None, overrides: list[str] | None = None, *,
                  aliases: dict[str, str] | None = None, unsupported: dict | None = None, hint: str = "") -> dict:
    """{field: value} for `cls` from the YAML file `path` (None: none) and then the command-line `overrides`
    (which win). Unknown keys, alias conflicts inside one source and unsupported values raise MftError; values
    are not coerced yet (`cls(**values)` does that)."""
    import os

    import yaml

    aliases, unsupported = aliases or {}, unsupported or {}
    values: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise MftError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise MftError(f"{path} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise MftError(f"{path} must hold a mapping of settings (key: value lines); got {type(data).__name__}")
        merge(values, data, f"in {path}", cls, aliases, unsupported, hint)
    merge(values, parse_overrides(overrides or [], override_kinds(cls, unsupported), aliases), "on the command line",
          cls, aliases, unsupported, hint)
    return values


def override_kinds(cls, unsupported: dict | None = None) -> dict[str, str]:
    """{key: kind} of the fields of `cls`, plus "bool" for unsupported keys whose harmless values are booleans
    (so that `--use_qlora` alone reads as true, and is refused as such)."""
    kinds = {f.name: kind_of(f) for f in fields(cls)}
    kinds.update({k: "bool" for k, (harmless, _) in (unsupported or {}).items()
                  if harmless and all(isinstance(v, bool) for v in harmless)})
    return kinds


def field_help(cls) -> list[tuple[str, str, object, str]]:
    """[(key, type, default, help)] for every field of `cls`, in declaration order (for --help texts)."""
    out = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((f.name, str(f.type), default, f.metadata.get("help", "")))
    return out


# -- argparse flags from a dataclass ---------------------------------------------------------------------------
def option(text: str, default=None, **metadata):
    """A dataclass field for a command's options: `default`, help `text` and the metadata keys above."""
    return dataclasses.field(default=default, metadata={"help": text, **metadata})


def _flag(name: str, spelling: str) -> str:
    return "--" + (name.replace("_", "-") if spelling == "kebab" else name.replace("-", "_"))


def add_arguments(parser: argparse.ArgumentParser, cls, *, spelling: str = "snake") -> None:
    """One argparse argument per field of the dataclass `cls`, dest = the field name, default = the field's.

    Flag `--<field>` in `spelling` ("snake" or "kebab"; metadata `spelling` overrides it per field, metadata
    `flag` names the flag when it is not the field's name, metadata `flags` adds published aliases);
    metadata `positional: True` makes a positional argument instead. bool -> a flag alone (store_true);
    list[str] -> one or more values (or, with metadata `action: append`, the flag repeated); int / float ->
    argparse's int / float. Help, choices, required, metavar and nargs come from the metadata; metadata
    `group` places the flag in an argument group of that title. The other spelling of every flag is accepted
    by `ArgumentParser`, not shown."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        md = f.metadata
        container = parser
        if md.get("group"):
            if md["group"] not in groups:
                groups[md["group"]] = parser.add_argument_group(md["group"])
            container = groups[md["group"]]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict = {"help": md.get("help", "").replace("%", "%%")}
        for key in ("choices", "metavar", "nargs"):
            if key in md:
                kw[key] = md[key]
        if md.get("positional"):
            container.add_argument(f.name, **kw)
            continue
        kind = kind_of(f).rstrip("?")
        if kind == "bool":
            kw["action"] = "store_true"
        elif md.get("action") == "append":
            kw["action"] = "append"
        elif kind == "list[str]":
            kw.setdefault("nargs", "+")
        elif kind in ("int", "float"):
            kw["type"] = int if kind == "int" else float
        if md.get("required"):
            kw["required"] = True
        else:
            kw["default"] = default
        own = md.get("spelling", spelling)
        names = [_flag(md.get("flag", f.name), own)] + [_flag(n, own) for n in md.get("flags", ())]
        container.add_argument(*names, dest=f.name, **kw)


def _other_spelling(option: str) -> str:
    name = option[2:]
    return "--" + (name.replace("-", "_") if "-" in name else name.replace("_", "-"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, accepting `--snake_case` and `--kebab-case` for every long flag it knows in either spelling
    (help shows the one it was added with). Sub-parsers made by `add_subparsers().add_parser` are of this class
    too, so every subcommand accepts both."""

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        known = {s for action in self._actions for s in action.option_strings}
        other = {_other_spelling(s): s for s in known if s.startswith("--") and len(s) > 2}
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                out += args[i:]
                break
            name, eq, value = arg.partition("=")
            if name.startswith("--") and name not in known and name in other:
                arg = other[name] + eq + value
            out.append(arg)
        return super().parse_known_args(out, namespace)
