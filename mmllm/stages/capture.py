"""Tees what a stage prints (stdout, stderr, logging) to its log file and keeps the last lines.

A failed stage's error then quotes the lines printed just before it failed, and
``<run>/stages/<name>/log.txt`` keeps the whole output. Output of child processes written
straight to the file descriptors (e.g. Ray workers) is not captured.
"""

from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path


class _Sink:
    """Appends text to a log file and keeps the last ``n`` non-empty lines (progress bars collapsed)."""

    def __init__(self, path: Path, n: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole stage)
        self.tail: collections.deque[str] = collections.deque(maxlen=n)
        self._partial = ""

    def write(self, text: str) -> None:
        if self.file.closed:  # a handler created during the stage may still hold the tee
            return
        self.file.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.rsplit("\r", 1)[-1].rstrip()  # a tqdm bar keeps only its last state
            if line:
                self.tail.append(line)

    def close(self) -> None:
        if self.file.closed:
            return
        if self._partial.strip():
            self.write("\n")
        self.file.close()


class _Tee:
    """A text stream that writes to the original stream and to a sink."""

    def __init__(self, stream, sink: _Sink):
        self._stream, self._sink = stream, sink

    def write(self, text: str) -> int:
        self._sink.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        if not self._sink.file.closed:
            self._sink.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


def _console_handlers(streams) -> list[logging.StreamHandler]:
    """Logging handlers (any logger) that write to one of ``streams`` (Hydra's console handler, ...)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler) and any(h.stream is s for s in streams)]


class CapturedOutput:
    """Context manager: while active, stdout/stderr/logging also go to ``path``.

    Args:
        path: the log file (appended to).
        n: how many of the last lines to keep.
        header: a first line for the log file (not part of the tail).

    Attributes:
        tail: the last ``n`` lines printed (available after the block).
    """

    def __init__(self, path: Path, *, n: int = 20, header: str = ""):
        self.path, self.n, self.header = Path(path), n, header
        self.tail: list[str] = []

    def __enter__(self) -> CapturedOutput:  # noqa: PYI034
        self._sink = _Sink(self.path, self.n)
        if self.header:  # into the file only: it separates the attempts of a stage in its log
            self._sink.file.write(self.header + "\n")
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._sink), _Tee(sys.stderr, self._sink)
        # Log records reach the console through handlers holding the original streams: point them
        # at the tees, so logged lines are captured once, like printed ones.
        self._handlers = [(h, h.stream) for h in _console_handlers(self._saved)]
        for h, stream in self._handlers:
            h.setStream(sys.stdout if stream is self._saved[0] else sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        for h, stream in self._handlers:
            h.setStream(stream)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved
        self._sink.close()
        self.tail = list(self._sink.tail)
