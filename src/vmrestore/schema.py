"""Reading typed documents (job, infrastructure, job state): one way to say what is wrong.

The documents are declared once as msgspec Structs (job.RestoreJob,
infra.InfraDoc, jobstate.StateDoc, ...); this module turns a file into one
and every failure into a one-line UsageError naming the file, the field and
its line: not text (a binary file), a syntax error (line, column), nesting
deeper than any real document (a parser would recurse until it crashes), a
field of the wrong type (msgspec names the path, ``$.proxies[0].slots``; the
YAML node marks give its line — JSON is read by the same composer for that).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, TypeVar

import msgspec

from vmrestore.errors import UsageError

T = TypeVar("T")

# No real document nests deeper than a handful of levels; parsers recurse per level.
MAX_DEPTH = 32
_PATH = re.compile(r" - at `(\$[^`]*)`$")


def check_depth(text: str, where: str, error: type[Exception] = UsageError) -> None:
    """Refuse nesting deeper than MAX_DEPTH before a recursive parser sees it (cheap scan)."""
    depth = 0
    quote = ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise error(f"{where}: nested deeper than {MAX_DEPTH} levels: not a "
                            "document this build reads")
        elif ch in "]}":
            depth = max(0, depth - 1)


def parse_error_text(e: Exception) -> str:
    """A YAML/JSON syntax error as one line with its line and column (a 3 a.m. fix needs both)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', '') or e}"
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_bytes(path: str | os.PathLike[str], where: str) -> bytes:
    """A document file's bytes; a file that cannot be read is one line (UsageError)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from None


def text_of(raw: bytes, where: str) -> str:
    """The document's text; a binary file is refused with where its first bad byte is."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise UsageError(f"{where}: not a text file (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not a text file (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start} is not UTF-8)") from None


def parse(text: str, where: str, json_only: bool = False) -> Any:
    """YAML (a superset of JSON) or, with json_only, strict JSON; errors say line and column."""
    import yaml

    check_depth(text, where)
    try:
        return json.loads(text) if json_only else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: not valid {'JSON' if json_only else 'YAML/JSON'}: "
                         f"{parse_error_text(e)}") from None
    except RecursionError:  # nesting the cheap scan cannot see (YAML block style)
        raise UsageError(f"{where}: nested too deeply: not a document this build reads") \
            from None


def line_of(text: str, path: str) -> int | None:
    """The 1-based line of the node at a msgspec path (``$.a[0].b``) in YAML/JSON text."""
    import yaml

    try:
        node = yaml.compose(text)
    except Exception:
        return None
    for part in re.findall(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]", path):
        key, index = part
        if index == "...":  # a value in a mapping (msgspec does not name the key): its parent
            break
        if isinstance(node, yaml.MappingNode) and key:
            node = next((v for k, v in node.value
                         if str(k.value).replace("-", "_") == key.replace("-", "_")), None)
        elif isinstance(node, yaml.SequenceNode) and index:
            i = int(index)
            node = node.value[i] if i < len(node.value) else None
        else:
            node = None
        if node is None:
            return None
    return node.start_mark.line + 1 if node is not None else None


def field_error(e: msgspec.ValidationError, where: str, text: str | None = None) -> UsageError:
    """'WHERE: field 'a.b' (line N): Expected `int`, got `str`' from a msgspec error."""
    msg = str(e)
    m = _PATH.search(msg)
    if m is None:
        return UsageError(f"{where}: {msg}")
    path, msg = m.group(1), msg[: m.start()]
    name = path[2:] if path.startswith("$.") else path[1:] or "(top level)"
    line = line_of(text, path) if text is not None else None
    at = f" (line {line})" if line else ""
    return UsageError(f"{where}: field '{name}'{at}: {msg}")


def convert(data: Any, typ: type[T], where: str, text: str | None = None,
            strict: bool = True, error: type[Exception] = UsageError) -> T:
    """data (parsed) as typ; a bad field is an error (UsageError) naming it and its line."""
    try:
        return msgspec.convert(data, typ, strict=strict)
    except msgspec.ValidationError as e:
        raise error(str(field_error(e, where, text))) from None


def load(raw: bytes, typ: type[T], where: str, json_only: bool = False) -> T:
    """Bytes of a YAML/JSON document -> typ, with every failure one line (UsageError)."""
    text = text_of(raw, where)
    return convert(parse(text, where, json_only), typ, where, text)
