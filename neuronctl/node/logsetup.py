"""The daemon's own log (the per-model logs are the workers' output, see logfiles.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMATS = ("text", "json")

# sd-daemon(3) priorities: journald reads a leading "<N>" on a stream line as the line's
# priority (SyslogLevelPrefix=yes, the default), so `journalctl -p warning` can filter.
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
    logging.DEBUG: 7,
}

# Libraries whose chatter drowns ours (connection pools, selectors, the Hub client): kept
# at warning whatever --log-level says; our own debug lines stay readable.
_CHATTY = ("asyncio", "urllib3", "filelock", "huggingface_hub", "httpx", "httpcore",
           "fsspec", "aiohttp.access")


def syslog_priority(levelno: int) -> int:
    for level, priority in sorted(_SYSLOG_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f) if c != 0x09}


class TextFormatter(logging.Formatter):
    """Plain lines. A message is one line whatever it quotes (a model path or id from a
    request, a worker's output): control characters are shown escaped, so nobody can
    forge a second journal line or send escapes to a terminal. Tracebacks keep theirs."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROL)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (Loki, Elasticsearch, Vector, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalFormatter(TextFormatter):
    """Text for journald: no time stamp (the journal adds its own) and the syslog priority
    prefix on every line of a record, a traceback's lines included."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_the_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the stream it connected; a
    redirected stderr (a file, a pipe) inherits the variable but is not that stream."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    text = "%(levelname)s %(name)s: %(message)s"
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif stderr_is_the_journal():
        handler.setFormatter(JournalFormatter(text))
    else:  # a terminal or a file needs our own stamp
        handler.setFormatter(TextFormatter("%(asctime)s " + text))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
