"""The HTML report in a real headless Chromium: renders, images load, no network.

Skipped where no Chromium binary or no Playwright package is installed
(``scripts/setup.sh dev`` installs both on Debian-like machines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scripts.check_report_html import check_reports, find_chromium
from trojanscan.report import Report

CHROMIUM = find_chromium()
pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary installed")


def test_report_renders_offline_with_every_image(tmp_path: Path) -> None:
    rep = Report(command="scan", out_dir=tmp_path / "r", seed=0, params={"x": 1})
    rep.set(verdict="backdoored", score=0.9, p_value=0.01, suspected_targets=[3])
    rel = rep.add_image("mask_3", np.linspace(0, 1, 64).reshape(8, 8), scale=4)
    rep.add_section("Trigger", f'<img alt="mask" src="{rep.image_uri(rel)}">')
    path = rep.write(1.0).with_suffix(".html")
    (res,) = check_reports([path], chromium=str(CHROMIUM), screenshots=tmp_path / "shots")
    assert res.ok, res
    assert res.verdict_text == "Verdict: backdoored" and res.images >= 1
    assert res.screenshot and Path(res.screenshot).stat().st_size > 1000


def test_the_check_catches_network_fetches_and_broken_images(tmp_path: Path) -> None:
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text('<html><head><title>t</title><script src="https://cdn.example/x.js">'
                    '</script></head><body><div class="verdict">Verdict: clean</div>'
                    '<img src="http://example.invalid/a.png"><img src="missing.png">'
                    "</body></html>")
    (res,) = check_reports([page], chromium=str(CHROMIUM))
    assert not res.ok
    assert any("cdn.example" in u for u in res.blocked_requests)
    assert any("example.invalid" in u for u in res.blocked_requests)
    assert len(res.broken_images) == 2
