"""Nested dataclass configs filled from YAML files and ``key=value`` command-line overrides.

A config is a tree of dataclasses (``TrainConfig.optim.lr``); keys are dotted paths into it.
Values are coerced to the field's annotation:

- ``int``, ``float``, ``bool`` (true/false, yes/no, on/off, 1/0), ``str``, ``pathlib.Path``;
  an int field accepts an integral float written as ``1e4``; PyYAML reads ``1e-4`` (no dot) as a
  string, so a float field accepts strings too.
- ``Optional[X]`` / ``X | None``: ``none``, ``null`` or ``~`` (any case) give None, even for
  ``Optional[str]``; other unions try their members in order.
- ``Literal[...]``: the value must be one of the listed ones.
- ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``: a YAML list, or on the command line either
  ``1,2,3`` or YAML flow syntax ``[1, 2, 3]``; ``dict[K, V]``: a YAML mapping.
- a nested dataclass: a YAML mapping of its fields (never a single command-line value).

Unknown keys raise `ConfigError` naming the key and the closest valid keys; bad values raise
`ConfigError` naming the key, the value and the expected type. `to_dict` gives the resolved tree
as plain YAML-safe values, `save_yaml` writes it.
"""

import dataclasses
import difflib
import pathlib
import types
import typing

import yaml

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config key that does not exist or a value that does not fit its field's type."""


def _means_none(value):
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _type_name(annotation):
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _field_types(instance):
    """{field name: resolved annotation} of a dataclass instance (string annotations resolved)."""
    hints = typing.get_type_hints(type(instance))
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(instance)}


def _all_keys(instance, prefix=""):
    """Every dotted key of the tree: sections and leaves."""
    keys = []
    for name, annotation in _field_types(instance).items():
        key = prefix + name
        keys.append(key)
        child = getattr(instance, name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            keys.extend(_all_keys(child, key + "."))
    return keys


def _unknown_key(root, key):
    candidates = _all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    # "lr" for "optim.lr": the same last part in another section is the likeliest intent.
    leaf = key.rsplit(".", 1)[-1]
    close += [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c not in close]
    hint = f"; did you mean {', '.join(repr(c) for c in close[:4])}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _bad_value(key, value, annotation, detail=""):
    extra = f" ({detail})" if detail else ""
    return ConfigError(f"config key {key!r}: cannot use {value!r} as {_type_name(annotation)}{extra}")


def _guess_scalar(text):
    """A comma-separated item as YAML reads it (``0.9`` a float, ``3`` an int, ``a`` a string),
    with ``1e-4`` a float too; typed fields coerce it further, untyped ones (bare ``tuple``) keep it."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value if isinstance(value, (int, float, bool)) or value is None else text


def _split_sequence(value, key, annotation):
    """(items, split): YAML lists pass through; strings are YAML flow syntax (``[1, 2]``) or
    comma-separated (``1,2``; the empty string is the empty sequence; ``split`` is True and the
    items are the raw strings)."""
    if isinstance(value, (list, tuple)):
        return list(value), False
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise _bad_value(key, value, annotation, f"not valid YAML: {e}") from None
            if not isinstance(parsed, list):
                raise _bad_value(key, value, annotation, "expected a list")
            return parsed, False
        return [] if text == "" else [part.strip() for part in text.split(",")], True
    raise _bad_value(key, value, annotation, "expected a list or comma-separated values")


def _coerce(value, annotation, key):
    """``value`` (a YAML value or a command-line string) converted to ``annotation``; raises
    ConfigError naming ``key`` when it does not fit."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and _means_none(value):
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        raise _bad_value(key, value, annotation)
    if origin is typing.Literal:
        for choice in args:
            try:
                if _coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                continue
        raise _bad_value(key, value, annotation, f"choose one of {', '.join(repr(a) for a in args)}")
    if origin in (tuple, list) or annotation in (tuple, list):
        items, split = _split_sequence(value, key, annotation)
        if (origin or annotation) is list:
            item_types = [args[0] if args else typing.Any] * len(items)
        elif not args or (len(args) == 2 and args[1] is Ellipsis):
            item_types = [args[0] if args else typing.Any] * len(items)
        else:
            if len(items) != len(args):
                raise _bad_value(key, value, annotation, f"expected {len(args)} items, got {len(items)}")
            item_types = list(args)
        if split:  # untyped comma-separated items: numbers as numbers, as YAML would read them
            items = [_guess_scalar(item) if t is typing.Any else item for item, t in zip(items, item_types)]
        coerced = [_coerce(item, t, f"{key}[{i}]") for i, (item, t) in enumerate(zip(items, item_types))]
        return coerced if (origin or annotation) is list else tuple(coerced)
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise _bad_value(key, value, annotation, f"not valid YAML: {e}") from None
        if not isinstance(value, dict):
            raise _bad_value(key, value, annotation, "expected a mapping")
        key_type, value_type = args if args else (typing.Any, typing.Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise _bad_value(key, value, annotation, "expected true/false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value = float(value)
            except ValueError:
                raise _bad_value(key, value, annotation) from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad_value(key, value, annotation, "expected an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _bad_value(key, value, annotation, "expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `run_name: 2024` as an int
        raise _bad_value(key, value, annotation, "expected a string")
    if annotation is pathlib.Path or (isinstance(annotation, type) and issubclass(annotation, pathlib.PurePath)):
        if isinstance(value, (str, pathlib.PurePath)):
            return annotation(value)
        raise _bad_value(key, value, annotation, "expected a path")
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _bad_value(key, value, annotation, "unsupported field type")


def _section_type(annotation):
    """The dataclass type of a section field (Optional[Section] included), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def _resolve(root, key):
    """(section instance, field name, annotation) for a dotted key; raises ConfigError when any
    part does not exist. A None section of a dataclass type is created with its defaults."""
    parts = key.split(".")
    node, path = root, []
    for part in parts[:-1]:
        path.append(part)
        types_here = _field_types(node)
        if part not in types_here:
            raise _unknown_key(root, key)
        child = getattr(node, part)
        if child is None and _section_type(types_here[part]) is not None:
            child = _section_type(types_here[part])()
            setattr(node, part, child)
        if not (dataclasses.is_dataclass(child) and not isinstance(child, type)):
            raise ConfigError(f"config key {key!r}: {'.'.join(path)!r} is a value, not a section")
        node = child
    types_here = _field_types(node)
    if parts[-1] not in types_here:
        raise _unknown_key(root, key)
    return node, parts[-1], types_here[parts[-1]]


def _set(root, key, value):
    node, name, annotation = _resolve(root, key)
    section = _section_type(annotation)
    clears = section is not annotation and _means_none(value)  # an Optional section set to None
    if section is not None and not clears:
        if not isinstance(value, dict):
            fields = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"config key {key!r} is a section; set its fields ({fields}) as {key}.<field>")
        if getattr(node, name) is None:
            setattr(node, name, section())
        for sub_key, sub_value in value.items():
            _set(root, f"{key}.{sub_key}", sub_value)
        return
    setattr(node, name, _coerce(value, annotation, key))


def load_yaml_into(instance, path):
    """Sets the fields of dataclass ``instance`` (in place) from the YAML mapping in ``path``;
    nested mappings fill nested sections, fields not named keep their values. An empty file
    changes nothing. Returns ``instance``. Raises ConfigError for unknown keys or bad values,
    FileNotFoundError when ``path`` does not exist."""
    if not (dataclasses.is_dataclass(instance) and not isinstance(instance, type)):
        raise TypeError(f"instance must be a dataclass instance, got {type(instance).__name__}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return instance
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    for key, value in data.items():
        _set(instance, str(key), value)
    return instance


def apply_overrides(instance, overrides):
    """Applies ``["optim.lr=1e-4", "model.vision_head=mlp", ...]`` to dataclass ``instance`` in
    place, left to right (a leading ``--`` is allowed). Returns ``instance``. Raises ConfigError
    for a missing ``=``, an unknown key (with suggestions) or a value that does not fit."""
    if not (dataclasses.is_dataclass(instance) and not isinstance(instance, type)):
        raise TypeError(f"instance must be a dataclass instance, got {type(instance).__name__}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set(instance, key, value)
    return instance


def to_dict(instance):
    """The config tree as plain YAML-safe values: dataclasses become dicts, tuples lists, paths
    strings."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    if isinstance(instance, pathlib.PurePath):
        return str(instance)
    return instance


def save_yaml(instance, path):
    """Writes ``to_dict(instance)`` to ``path`` as YAML (field order kept); `load_yaml_into`
    reads it back to an equal config."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(instance), f, sort_keys=False)
