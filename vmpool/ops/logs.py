"""structlog: JSON lines on stdout, a readable console renderer on a terminal.

Every record, from structlog or from the standard library (asyncpg, aiohttp,
kubernetes-asyncio), from the serving thread or the background thread, goes
through one ``LineWriter``: one lock, and each line written whole with its
newline. (structlog's PrintLogger and logging's StreamHandler each had their
own lock, and print() writes the text and the newline separately: with
PYTHONUNBUFFERED=1 two records could share a line.) When stdout is closed
(`vmpool serve | head -1`), logs are dropped and the server keeps serving.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import select
import sys
import threading
import time
from json import JSONEncoder
from typing import Any

import structlog

from vmpool.core.echo import echo

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LineWriter:
    """Writes whole lines to a file descriptor, one at a time, from any thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self.closed = False

    def write_line(self, line: str) -> None:
        data = memoryview((line + "\n").encode("utf-8", "backslashreplace"))
        with self._lock:
            if self.closed:
                return
            try:
                while data:
                    try:
                        data = data[os.write(self._fd, data) :]
                    except BlockingIOError:  # a non-blocking stdout: wait until it drains
                        select.select([], [self._fd], [], 1.0)
            except OSError as err:
                if err.errno not in (errno.EPIPE, errno.EBADF, errno.EINVAL):
                    raise
                self._reader_gone()

    def _reader_gone(self) -> None:
        """Nobody reads our stdout any more: drop every later line, and point the
        descriptor at /dev/null so nothing else (a print, the interpreter's final
        flush) fails on it either."""
        self.closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._fd)
            os.close(devnull)
        except OSError:
            pass  # dropped all the same


class _LineLogger:
    """structlog's logger: hands the rendered line to the writer."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write_line(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _LineHandler(logging.Handler):
    """The standard library's handler: formats the record, hands it to the writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._writer.write_line(line)


# Libraries that log a traceback for an expected, retried condition: asyncpg's
# pool logs one for every failed reconnect while PostgreSQL is down. The error
# itself is kept (type and message, cut short) on the record's line.
QUIET_TRACEBACK_LOGGERS = ("asyncpg.pool",)
MAX_ERROR_CHARS = 300


def without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: ``record``'s exception as an ``error`` text instead of
    a traceback. Always keeps the record."""
    if record.exc_info and record.exc_info[1] is not None:
        err = record.exc_info[1]
        record.error = echo(f"{type(err).__name__}: {err}", MAX_ERROR_CHARS)
        record.exc_info = None
        record.exc_text = None
    return True


_CONTEXT_PREFIX = "structlog_"  # structlog.contextvars' names for bound keys
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level


def _fallback(obj: Any) -> Any:
    """What JSON cannot encode: its __structlog__ form, else its repr (as structlog)."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


class JsonLine:
    """The JSON line of a structlog record in one processor: the same keys as
    merge_contextvars, add_log_level, TimeStamper(fmt="iso", utc=True),
    format_exc_info and JSONRenderer one after another, at about half the cost
    (the timestamp's date and time are formatted once a second, the encoder is
    built once). Every call line and audit line goes through it."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # one tuple: read whole by either thread
        self._encode = JSONEncoder(default=_fallback).encode

    def timestamp(self, now: float) -> str:
        """``now`` (seconds since the epoch) as ISO 8601 UTC to the microsecond."""
        second = int(now)
        cached, text = self._second
        if cached != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int((now - second) * 1_000_000):06d}Z"

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        for var, value in contextvars.copy_context().items():
            if value is not Ellipsis and var.name.startswith(_CONTEXT_PREFIX):
                event_dict.setdefault(var.name[len(_CONTEXT_PREFIX) :], value)
        event_dict["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event_dict["timestamp"] = self.timestamp(time.time())
        if "exc_info" in event_dict:
            event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
        line: str = self._encode(event_dict)
        return line


def setup(level: str = "info", *, json: bool | None = None, fd: int | None = None) -> LineWriter:
    """Configure structlog and the standard library's root logger to write to
    ``fd`` (stdout's descriptor by default)."""
    if fd is None:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    if json is None:
        json = not os.isatty(fd)
    writer = LineWriter(fd)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    processors: list[structlog.typing.Processor] = (
        [JsonLine()]
        if json
        else [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ]
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_args: _LineLogger(writer),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library come out as the same
    # one-line JSON records, with any traceback inside the record rather than
    # spread over lines.
    handler = _LineHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(allow=["error"]),
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    for name in QUIET_TRACEBACK_LOGGERS:
        quiet = logging.getLogger(name)
        if without_traceback not in quiet.filters:
            quiet.addFilter(without_traceback)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(LEVELS[level], logging.WARNING))
    return writer
