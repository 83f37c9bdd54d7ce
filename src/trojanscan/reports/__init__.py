"""Reports: ``report.json`` (the contract's keys, full precision) and a self-contained
``report.html`` for people (verdict sentence first, rounded scores, class names).

:class:`Report` builds one command's report folder (:mod:`.report`), :mod:`.html`
renders the page, :mod:`.sections` adds the model-level methods' evidence,
:mod:`.plots` is the one plotting helper and :mod:`.text` formats for people.
"""

from __future__ import annotations

from ..results import to_json, utf8_safe
from .report import SCHEMA_VERSION, Report, png_bytes, versions
from .text import esc

__all__ = ["SCHEMA_VERSION", "Report", "esc", "png_bytes", "to_json", "utf8_safe",
           "versions"]
