"""Open trojanscan ``report.html`` files in a real headless Chromium and check them.

For each report: it renders (a page title and the verdict line exist), every ``<img>``
has loaded (``complete`` and a non-zero natural width), the browser logged no errors,
and **no request left the file** — every request other than the page itself and
``data:`` URIs is blocked and counted as a failure. Optionally a full-page PNG
screenshot is written (``--screenshots DIR``).

Needs Playwright's Python package (``pip install playwright``; its own browsers are not
needed) and a Chromium binary (Debian: ``apt-get install chromium``); ``--chromium``
picks the binary, otherwise ``chromium``/``chromium-browser``/``google-chrome`` on PATH.

Usage::

    python scripts/check_report_html.py OUT/report.html [...] --screenshots docs/img

Exit status 0 when every report passes, 1 otherwise, 2 when no browser is available.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class PageCheck:
    """What the browser saw of one report."""

    path: str
    title: str = ""
    verdict_text: str = ""
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    height_px: int = 0
    screenshot: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.title) and bool(self.verdict_text) and not (
            self.broken_images or self.blocked_requests or self.console_errors)


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def check_reports(paths: list[Path], *, chromium: str, screenshots: Path | None = None,
                  width: int = 1200) -> list[PageCheck]:
    """Open each report in headless Chromium (network blocked) and report what it saw."""
    from playwright.sync_api import sync_playwright

    results: list[PageCheck] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            for path in paths:
                results.append(_check_one(browser, Path(path).resolve(), screenshots, width))
        finally:
            browser.close()
    return results


def _check_one(browser, path: Path, screenshots: Path | None, width: int) -> PageCheck:
    res = PageCheck(path=str(path))
    page_url = path.as_uri()
    context = browser.new_context(viewport={"width": width, "height": 900},
                                  java_script_enabled=True, offline=True)
    page = context.new_page()

    def route(r) -> None:
        url = r.request.url
        if url == page_url or url.startswith("data:"):
            r.continue_()
        else:
            res.blocked_requests.append(url[:200])
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: res.console_errors.append(m.text[:200])
            if m.type == "error" else None)
    page.on("pageerror", lambda e: res.console_errors.append(str(e)[:200]))
    page.goto(page_url, wait_until="load")
    res.title = page.title()
    verdict = page.locator(".verdict")
    res.verdict_text = verdict.first.inner_text() if verdict.count() else ""
    imgs = page.evaluate("""() => Array.from(document.images).map(i => ({
        src: i.getAttribute('src') || '', ok: i.complete && i.naturalWidth > 0}))""")
    res.images = len(imgs)
    res.broken_images = [i["src"][:80] for i in imgs if not i["ok"]]
    res.height_px = int(page.evaluate("() => document.documentElement.scrollHeight"))
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
        shot = screenshots / f"{path.parent.name}-{path.stem}.png"
        page.screenshot(path=str(shot), full_page=True)
        res.screenshot = str(shot)
    context.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--screenshots", type=Path, default=None, help="write full-page PNGs here")
    ap.add_argument("--chromium", default=None, help="browser binary")
    ap.add_argument("--width", type=int, default=1200)
    a = ap.parse_args(argv)
    chromium = find_chromium(a.chromium)
    if chromium is None:
        print("error: no Chromium found (apt-get install chromium, or --chromium PATH)",
              file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("error: the playwright package is needed (pip install playwright)",
              file=sys.stderr)
        return 2
    missing = [str(p) for p in a.reports if not p.is_file()]
    if missing:
        print(f"error: no such report: {', '.join(missing)}", file=sys.stderr)
        return 2
    results = check_reports(a.reports, chromium=chromium, screenshots=a.screenshots,
                            width=a.width)
    for r in results:
        print(json.dumps({**asdict(r), "ok": r.ok}))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
