"""The daemon's log lines. A per-message or per-request record carries its `fields`; the text
format writes them as logfmt `key=value` pairs (grep and log shippers both cope), the JSON format
as keys of one object per line."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

_LOGFMT_BARE = re.compile(r"[^\s\"=\\]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def logfmt(fields: dict[str, Any]) -> str:
    """`key=value` pairs, values quoted where needed."""
    parts = []
    for key, value in fields.items():
        text = _CONTROL.sub(" ", "" if value is None else str(value))  # one line, always
        if not _LOGFMT_BARE.fullmatch(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class LogfmtFormatter(logging.Formatter):
    """A plain text line; a record's `fields` take the place of its message."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # a copy: other handlers see the record unchanged
            record = logging.makeLogRecord({**record.__dict__, "msg": logfmt(fields), "args": None})
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a record's `fields` become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
