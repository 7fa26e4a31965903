"""Kubernetes label selectors, as the API server parses them (the string form)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Matcher = Callable[[Mapping[str, str]], bool]

_SET = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)$")
_KEY = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_./]*)?[A-Za-z0-9]$")


def _split(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def _key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"invalid label key {key!r}")
    return key


def _term(term: str) -> Matcher:
    m = _SET.match(term)
    if m:
        key = _key(m["key"])
        values = {v.strip() for v in m["values"].split(",") if v.strip()}
        if m["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if term.startswith("!"):
        key = _key(term[1:].strip())
        return lambda labels: key not in labels
    if "!=" in term:
        key, value = (p.strip() for p in term.split("!=", 1))
        _key(key)
        return lambda labels: labels.get(key) != value
    if "=" in term:
        sep = "==" if "==" in term else "="
        key, value = (p.strip() for p in term.split(sep, 1))
        _key(key)
        if "=" in value:
            raise ValueError(f"invalid selector term {term!r}")
        return lambda labels: labels.get(key) == value
    key = _key(term)
    return lambda labels: key in labels


def parse_selector(text: str | None) -> Matcher:
    """A predicate over labels; raises ValueError on a malformed selector."""
    if not text:
        return lambda labels: True
    matchers = [_term(t) for t in _split(text)]
    return lambda labels: all(m(labels) for m in matchers)
