"""One-line reports of command-line mistakes: the key, the rejected value and what the key accepts.

jsonargparse reports a bad value as a chain of exceptions (``__cause__``) whose messages nest every
union member it tried. This module reads only the stable parts of that chain: the ``Parser key "…"``
prefix of each level (the key path), the value (jsonargparse's ``NestedArg`` record, or its
"Got value:" / "Given value:" line, whichever this version writes, or else the command line itself),
and takes what the key accepts from the classes' own type hints (``Literal`` choices, the type, the
subclasses of a class), not from the prose. Errors raised while the classes are built (our own
argument checks) get the key from the ``__init__`` frame that raised them.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml

Roots = Mapping[str, Callable[..., Any]]  # "model" -> DetectorModule, ..., "" -> Trainer.<subcommand>

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')
_NESTED = re.compile(r"NestedArg\(key='([^']*)', val=(.*)\)\s*$", re.M)
_VALUE = re.compile(r"^\s*(?:Got|Given) value: (.*)$|\. (?:Got|Given) value: (.*)$", re.M)
_CLASS_PATH = re.compile(r"class_path '([^']+)'")
_UNKNOWN = re.compile(r"[Oo]ption '([^']+)'")
_GROUP = re.compile(r"Group '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")
# not options: self, catch-alls, and what LightningCLI passes itself (LightningCLI.subcommands())
_SKIPPED = {"self", "args", "kwargs", "model", "datamodule", "dataloaders", "train_dataloaders", "val_dataloaders"}
CKPT_WORDS = ("last", "best", "hpc", "registry")  # the names Lightning's ckpt_path accepts besides a file


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return chain


def summarize_parse_error(err: BaseException, roots: Roots, argv: Sequence[str] = ()) -> str:
    """One line for a jsonargparse parse error: ``<key>: <value> is not valid[; did you mean …]; accepted: …``."""
    messages = [str(e) for e in exception_chain(err)]
    keys: list[str] = []
    for m in messages:
        found = _PARSER_KEY.match(m)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
    class_paths = [c for m in messages for c in _CLASS_PATH.findall(m)]
    unknown = _unknown_key(messages, keys)
    if unknown:
        return _unknown_line(unknown, roots, class_paths)
    if not keys or keys == ["config"]:
        bad = _bad_config(argv)
        if bad:
            return bad
    if not keys:
        return " ".join(messages[0].split())
    path = ".".join(keys).split(".")
    nested = [found for m in messages if (found := _NESTED.search(m))]  # jsonargparse's (key, value) records
    if nested and nested[0].group(1).split(".")[-1] == "class_path":
        path.append("class_path")
    value = _value(messages, nested, path, argv)
    hint = _resolve(roots, [p for p in path if p != "class_path"], class_paths)
    if hint is None:  # no signature to read: jsonargparse's innermost reason
        reason = next(_VALUE.sub("", m).strip() for m in reversed(messages) if m.strip())
        return f"{'.'.join(path)}: {value!r} is not valid ({' '.join(reason.split())})"
    choices = list(dict.fromkeys(_choices(hint)))
    close = difflib.get_close_matches(str(value).split(".")[-1], choices, n=3, cutoff=0.6)
    mean = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{'.'.join(path)}: {value!r} is not valid{mean}; accepted: {describe(hint)}"


def summarize_init_error(err: BaseException) -> str:
    """One line for an argument check that failed while the CLI built a class, prefixed with its key.

    The key is found in the outermost ``__init__`` frame of a model, datamodule, trainer or callback:
    the parameter the message starts with, or the string parameter whose value it quotes. A message
    that already starts with the key, or names none, is left as it is.
    """
    message = " ".join(str(err).split()) or type(err).__name__
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        group = _group_of(owner) if frame.f_code.co_name == "__init__" else None
        if group is None or message.startswith(f"{group}."):  # not ours, or the key is named already
            continue
        for name in inspect.signature(type(owner)).parameters:
            if message.startswith(f"{name} "):
                return f"{group}.{message}"
            given = frame.f_locals.get(name)
            if isinstance(given, str) and given and repr(given) in message:
                return f"{group}.{name}: {message}"
        return message
    return message


def check_ckpt_path(path: str | Path | None) -> str | None:
    """The one-line error for a ``ckpt_path`` that names no checkpoint file, else None."""
    text = None if path is None else str(path)
    if text is None or text in CKPT_WORDS or text.startswith("registry:") or "://" in text or Path(text).is_file():
        return None
    what = "is a folder" if Path(text).is_dir() else "does not exist"
    return f"ckpt_path: {text!r} {what}; accepted: a checkpoint file or one of {', '.join(map(repr, CKPT_WORDS))}"


def describe(hint: Any) -> str:
    """What a type hint accepts, in words: ``one of 'skip', 'stop'``, ``an int or null``, ``a Loss (A, B)``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        literals = [c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
        words = [describe(Literal[tuple(dict.fromkeys(literals))])] if literals else []  # one list of choices
        words += [describe(a) for a in args if a is not type(None) and typing.get_origin(a) is not Literal]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if hint is type(None):
        return "null"
    if hint is bool:
        return "true or false"
    if hint in (int, float, str):
        return {int: "an int", float: "a float", str: "a string"}[hint]
    if origin is list and len(args) == 1:
        return f"a list of {args[0].__name__ if isinstance(args[0], type) else describe(args[0])}"
    if origin is dict and len(args) == 2:
        return f"a mapping of {describe(args[0]).removeprefix('a ')} to {describe(args[1])}"
    if origin in (tuple, list, dict) or hint in (tuple, list, dict):
        return "a " + str(hint).replace("typing.", "")
    if isinstance(hint, type):
        names = _subclass_names(hint)
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        article = "an" if hint.__name__[:1].lower() in "aeiou" else "a"
        return f"{article} {hint.__name__}" + (f" ({shown})" if names and names != [hint.__name__] else "")
    return str(hint).replace("typing.", "")


def _value(messages: list[str], nested: list[re.Match], path: list[str], argv: Sequence[str]) -> Any:
    """The rejected value: jsonargparse's innermost record of it, else the command line's."""
    if nested:
        return _literal(nested[-1].group(2))
    for m in reversed(messages):
        found = [a or b for a, b in _VALUE.findall(m)]
        if found:
            return found[-1].strip()
    key = ".".join(p for p in path if p != "class_path")
    given = [v for k, v in _options(argv) if k in (key, ".".join(path))]
    return given[-1] if given else "?"


def _options(argv: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(key, value)`` of each ``--key value`` / ``--key=value`` in ``argv``, ``init_args`` dropped."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        yield key.replace(".init_args.", ".").rstrip("+"), value


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _resolve(roots: Roots, path: list[str], class_paths: list[str]) -> Any:
    """The type hint of ``path`` (e.g. ``model.loss.normalize``) from the signatures; None when unknown."""
    if path and path[0] in roots:
        owner: Any = roots[path[0]]
        names = path[1:]
    else:
        owner, names = roots.get(""), path
    hint: Any = None
    for i, name in enumerate(names):
        cls = owner if i == 0 else _class_in(hint, class_paths)
        if cls is None:
            return None
        try:  # a class's signature is its __init__'s; eval_str resolves postponed annotations
            param = inspect.signature(cls, eval_str=True).parameters.get(name)
        except Exception:  # a hint that cannot be resolved: no description
            return None
        if param is None or param.annotation is inspect.Parameter.empty:
            return None
        hint = param.annotation
    return hint


def _class_in(hint: Any, class_paths: list[str]) -> type | None:
    """The class a hint allows (the one named by a given ``class_path`` when it is a subclass)."""
    classes = [a for a in (typing.get_args(hint) or (hint,)) if isinstance(a, type) and a is not type(None)]
    for path in reversed(class_paths):
        module, _, name = path.rpartition(".")
        try:  # the user's class_path: it may name no module at all
            found = getattr(importlib.import_module(module), name, None) if module else None
        except ImportError:
            found = None
        if isinstance(found, type) and any(issubclass(found, c) for c in classes):
            return found
    return classes[0] if classes else None


def _choices(hint: Any) -> list[str]:
    """Every literal choice and class name a hint accepts (for "did you mean")."""
    if typing.get_origin(hint) is Literal:
        return [str(a) for a in typing.get_args(hint)]
    if isinstance(hint, type) and hint not in (int, float, str, bool, type(None)):
        return _subclass_names(hint)
    return [c for a in typing.get_args(hint) for c in _choices(a)]


def _subclass_names(base: type) -> list[str]:
    """Names of ``base`` and its imported subclasses that can be built (not abstract, not private)."""
    seen, todo = set(), [base]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return sorted({c.__name__ for c in seen if not inspect.isabstract(c) and not c.__name__.startswith("_")})


def _unknown_key(messages: list[str], keys: list[str]) -> str | None:
    """``--<key>`` of an unknown option (command line or config file), a stray word as it is, or None."""
    for m in messages:
        found = _UNRECOGNIZED.search(m)
        if found:
            return found.group(1).split()[0]
    for m in reversed(messages):
        found = _UNKNOWN.search(m)
        if found:
            group = _GROUP.search(m)
            return "--" + ".".join([*keys, *([group.group(1)] if group else []), found.group(1)])
    return None


def _unknown_line(token: str, roots: Roots, class_paths: list[str]) -> str:
    if not token.startswith("-"):
        return f"{token!r} is not an option or a subcommand; accepted: --<key> <value>, or a subcommand first: fit, validate, test, predict"
    key = token.lstrip("-").replace(".init_args.", ".").rstrip("+")
    parent, _, name = key.rpartition(".")
    known = _known_options(roots, parent.split(".") if parent else [], class_paths)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    prefix = f"{parent}." if parent else ""
    mean = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    listed = f"; accepted under {parent or 'the top level'}: {', '.join(known)}" if known and not close else ""
    return f"{key}: unknown option{mean}{listed}"


def _known_options(roots: Roots, path: list[str], class_paths: list[str]) -> list[str]:
    if not path:  # the groups, the subcommand method's own arguments, and the CLI's
        method = roots.get("")
        own = [p for p in inspect.signature(method).parameters if p not in _SKIPPED] if method else []
        return sorted({*(k for k in roots if k), *own, "seed_everything", "config", "print_config"})
    owner = roots.get(path[0]) if len(path) == 1 else _class_in(_resolve(roots, path, class_paths), class_paths)
    if owner is None:
        return []
    return [p for p in inspect.signature(owner).parameters if p not in _SKIPPED]


def _bad_config(argv: Sequence[str]) -> str | None:
    """The first ``--config`` file of ``argv`` that is missing or not YAML, as one line."""
    files = [v for k, v in _options(argv) if k == "config"] + [
        argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"
    ]
    for name in files:
        path = Path(name)
        if not path.is_file():
            return f"config: {name!r} {'is a folder' if path.is_dir() else 'does not exist'}; accepted: a YAML file"
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            return f"config: {name!r} is not valid YAML ({' '.join(str(err).split())}); accepted: a YAML file"
    return None


def _group_of(owner: Any) -> str | None:
    if isinstance(owner, L.LightningModule):
        return "model"
    if isinstance(owner, L.LightningDataModule):
        return "data"
    if isinstance(owner, L.Trainer):
        return "trainer"
    if isinstance(owner, L.Callback):
        return "trainer.callbacks"
    return None
