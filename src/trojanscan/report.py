"""The report builder under its former name: see :mod:`trojanscan.reports`."""

from __future__ import annotations

from .reports import SCHEMA_VERSION, Report, esc, png_bytes, to_json, utf8_safe, versions

#: the one JSON conversion under its former name
json_safe = to_json

__all__ = ["SCHEMA_VERSION", "Report", "esc", "json_safe", "png_bytes", "utf8_safe",
           "versions"]
