"""Reading a config: YAML file (or the built-in demo), command-line values and
the environment, validated into a Config; every mistake named by its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vmpool.config.database import check_database_url
from vmpool.config.demo import DEMO_CONFIG
from vmpool.config.schema import Config


class ConfigError(Exception):
    """A config file that cannot be used. Each problem names its key; str() is
    one line listing them all, ``lines()`` one line per problem."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    def lines(self) -> list[str]:
        return self.problems


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in {"constrained-str", "lax-or-strict"}:
            continue
        else:
            out += f".{part}" if out else part
    return out


def _explain_one(error: Any) -> str:
    where = _location(error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    if where.endswith(("_consistent", "_pools")) or not where:
        return str(msg)
    return f"{where}: {msg}"


def _explain(err: ValidationError) -> list[str]:
    """Every mistake pydantic found, one message each, in file order."""
    out: list[str] = []
    for error in err.errors():
        text = _explain_one(error)
        if text not in out:
            out.append(text)
    return out


def _problems(source: str, problems: list[str]) -> ConfigError:
    lines = [f"{source}: {p}" for p in problems]
    if len(lines) == 1:
        return ConfigError(lines[0], lines)
    return ConfigError(f"{source}: {len(lines)} mistakes: " + "; ".join(problems), lines)


_NUL_MARK = "\ufdd0NUL\ufdd0"  # a noncharacter: stands for a NUL while YAML parses


def _nul_key(data: Any, where: str = "") -> str | None:
    """The key path of the first NUL (or stand-in for one) in parsed config data."""
    if isinstance(data, str):
        return where if ("\x00" in data or _NUL_MARK in data) else None
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if _nul_key(key, path) is not None:
                return path
            found = _nul_key(value, path)
            if found is not None:
                return found
    if isinstance(data, list):
        for i, value in enumerate(data):
            found = _nul_key(value, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def parse_config(data: Any, *, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    nul = _nul_key(data)
    if nul is not None:
        raise ConfigError(f"{source}: {nul}: contains a NUL character")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _problems(source, _explain(err)) from None


def load_config(
    path: str | Path | None,
    env: dict[str, str] | None = None,
    flags: dict[str, str] | None = None,
) -> Config:
    """Read and validate a YAML file; ``None`` means the built-in demo.
    ``flags``: command-line values by config key (``metrics_listen``); they win
    over the file and are validated with it, a mistake named by its flag."""
    source = "demo config" if path is None else str(path)
    data = _read(path)
    if flags and isinstance(data, dict | None):
        data = {**(data or {}), **flags}
    try:
        config = parse_config(data, source=source)
    except ConfigError as err:
        if not flags:
            raise
        lines = [_as_flag(line, source, flags) for line in err.lines()]
        raise ConfigError(lines[0] if len(lines) == 1 else str(err), lines) from None
    url = (env or {}).get("VMPOOL_DATABASE_URL", "")
    if url:
        try:
            check_database_url(url)
        except ValueError as err:
            raise ConfigError(f"environment: VMPOOL_DATABASE_URL: {err}") from None
        config = config.model_copy(update={"database_url": url})
    return config


def _as_flag(line: str, source: str, flags: dict[str, str]) -> str:
    """A problem with a key the command line set, named by its flag."""
    for key in flags:
        prefix = f"{source}: {key}: "
        if line.startswith(prefix):
            return f"--{key.replace('_', '-')}: {line.removeprefix(prefix)}"
    return line


def _read(path: str | Path | None) -> Any:
    """The data of a YAML config file; ``None``: the built-in demo's."""
    if path is None:
        return DEMO_CONFIG
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if "\x00" in text:  # YAML refuses it without naming a key; find the key ourselves
        text = text.replace("\x00", _NUL_MARK)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line, with the line and column in the file (its own
    text names the "<unicode string>" it was handed, not the file)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{problem} ({context})" if context else str(problem))
