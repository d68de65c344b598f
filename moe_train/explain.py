"""`moe-train config --explain [KEY]`: every config key with its type, default, allowed values and meaning.

The meaning is read from the comments of config.py's dataclasses (the comment lines right above a field and its
inline comment; a field under a shared comment, with no comment of its own, gets that comment too), so the
explanation never drifts from the source. Allowed values come from config.CHOICES (the project's choice tuples).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import io
import re
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moe_train import config as config_module
from moe_train.config import CHOICES, Config, ConfigError


@dataclass
class KeyInfo:
    key: str  # section.key, e.g. model.moe.top_k
    type: str
    default: Any
    allowed: Optional[tuple]
    meaning: str  # the whole comment, one line

    @property
    def short(self) -> str:
        """The first sentence of the meaning, at most SHORT characters."""
        text = _sentences(self.meaning)[0] if self.meaning else ""
        return text if len(text) <= SHORT else text[:SHORT - 3].rstrip() + "..."


SHORT = 100


def _sentences(text: str) -> list[str]:
    """Split at '. ' / '; ' outside parentheses when an upper-case letter or a backquote follows ('e.g. ', 'et al.
    (2024)' stay whole)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch in ".;" and depth <= 0 and text[i + 1:i + 2] == " " and (text[i + 2:i + 3].isupper() or ch == ";"):
            out.append(text[start:i].strip())
            start = i + 2
    out.append(text[start:].strip().rstrip("."))
    return [s for s in out if s] or [""]


def _shared(comment: str, name: str) -> bool:
    """Whether a comment block speaks for the fields under it: it names the field, or it is headed by a topic
    ("Balancing: ...", "Compute budget (null router): ...")."""
    head = comment.split(":", 1)[0]
    return name in comment or (":" in comment and comment[:1].isupper() and len(head) < 60)


def _from_docstring(doc: str, name: str) -> str:
    """The docstring sentence that defines ``name`` (starts with ``name:`` or ````name````, else mentions it)."""
    sentences = []
    for para in doc.split("\n\n"):
        flat = " ".join(para.split())
        sentences += [s.strip() for s in re.split(r"(?<=\.) (?![^(]*\))", flat) if s.strip()]
    for sentence in sentences:
        if sentence.startswith((f"{name}:", f"``{name}``")):
            return sentence
    return next((s for s in sentences if f"``{name}``" in s), "")


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> its comment: the comment lines directly above (no blank line between) and the
    inline comment, joined; a field without either inherits the block above its predecessor when nothing
    separates them."""
    lines = source.splitlines()
    comments = _comments(source)
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        inherited = ""
        prev_end = None
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                prev_end, inherited = None, ""
                continue
            above, n = [], stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            inline = comments.get(stmt.end_lineno or stmt.lineno, "")
            if above:
                inherited = " ".join(above)
            elif inline or prev_end is None or prev_end != stmt.lineno - 1:
                inherited = ""  # a field with only its own inline comment ends the shared block
            if not above and not inline and not _shared(inherited, stmt.target.id):
                inherited = ""
            text = " ".join(t for t in above + [inline] if t) if above or inline else inherited
            if not text:
                text = _from_docstring(ast.get_docstring(node) or "", stmt.target.id)
            out[(node.name, stmt.target.id)] = text
            prev_end = stmt.end_lineno
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union,) or type(tp).__name__ == "UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is typing.Literal:  # a choice key (config.py): the type of its values; the values are listed apart
        return type(typing.get_args(tp)[0]).__name__
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_keys() -> list[KeyInfo]:
    """Every leaf key of a config, in the order of the dataclasses."""
    comments = _field_comments(Path(config_module.__file__).read_text())
    out: list[KeyInfo] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{key}.")
                continue
            out.append(KeyInfo(key, _type_name(tp), _default(f), CHOICES.get(key),
                               comments.get((cls.__name__, f.name), "")))

    walk(Config, "")
    return out


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (list, tuple)) else str(value)


def explain(key: Optional[str] = None) -> str:
    """Every key (one line each), or one key in full; an unknown key is a ConfigError naming the closest ones."""
    keys = config_keys()
    if not key:
        width = max(len(k.key) for k in keys)
        lines = []
        for k in keys:
            allowed = f"  one of {', '.join(map(_yaml, k.allowed))}" if k.allowed else ""
            lines.append(f"{k.key:<{width}}  {k.type} = {_yaml(k.default)}{allowed}"
                         + (f"  # {k.short}" if k.short else ""))
        return "\n".join(lines)
    by_name = {k.key: k for k in keys}
    section = [k for k in keys if k.key.startswith(f"{key}.")]
    if key not in by_name and section:  # a section: its keys in full
        return "\n\n".join(_full(k) for k in section)
    if key not in by_name:
        leaf = key.rsplit(".", 1)[-1]
        close = [k.key for k in keys if k.key.rsplit(".", 1)[-1] == leaf]
        close += [c for c in difflib.get_close_matches(key, list(by_name), n=5, cutoff=0.5) if c not in close]
        close += [c for c in difflib.get_close_matches(leaf, [k.key.rsplit(".", 1)[-1] for k in keys], n=3)
                  for c in [next(k.key for k in keys if k.key.rsplit(".", 1)[-1] == c)] if c not in close]
        hint = f"; closest: {', '.join(close[:5])}" if close else "; `moe-train config --explain` lists every key"
        raise ConfigError(f"{key}: unknown config key{hint}")
    return _full(by_name[key])


def _full(k: KeyInfo) -> str:
    lines = [k.key, f"  type:    {k.type}", f"  default: {_yaml(k.default)}"]
    if k.allowed:
        lines.append(f"  allowed: {', '.join(map(_yaml, k.allowed))}")
    lines.append(f"  meaning: {k.meaning or '(no comment in moe_train/config.py)'}")
    return "\n".join(lines)
