"""Headless Chromium for tests, driven by Selenium through Debian's chromedriver.

``make test`` installs the Debian packages ``chromium`` and ``chromium-driver``
(``make system-deps``). Where they are missing the browser tests are skipped
with the reason -- except in CI (``CI=true``), where they fail: a silent skip
there would hide that the dashboard was never loaded in a real browser.

Selenium is pointed at the system binaries explicitly, so Selenium Manager
never tries to download a browser or a driver (tests run offline).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "artifacts_dir",
    "browser_problem",
    "chromium",
    "require_browser",
    "severe_console_entries",
]

CHROMIUM = Path(os.environ.get("EDGEOTA_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("EDGEOTA_CHROMEDRIVER", "/usr/bin/chromedriver"))
REPO = Path(__file__).resolve().parent.parent
PAGE_LOAD_TIMEOUT = 30  # seconds
WINDOW = (1400, 1800)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def browser_problem() -> str | None:
    """Why no headless browser can run here, or None when one can."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"{' and '.join(missing)} missing: install the Debian packages chromium and "
                "chromium-driver (make system-deps)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def require_browser() -> None:
    """Skip the test when there is no browser; fail instead in CI."""
    problem = browser_problem()
    if problem is None:
        return
    if _in_ci():
        pytest.fail(f"CI=true requires the browser tests: {problem}")
    pytest.skip(problem)


def artifacts_dir() -> Path:
    """Where screenshots go: ``$EDGEOTA_ARTIFACTS`` or ``<repo>/test-artifacts``."""
    folder = Path(os.environ.get("EDGEOTA_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium WebDriver with console logging on; quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_browser()
    with tempfile.TemporaryDirectory(prefix="edgeota-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--disable-default-apps", "--no-default-browser-check",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=str(CHROMEDRIVER))
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
            yield driver
        finally:
            driver.quit()


def severe_console_entries(driver: object) -> list[dict]:
    """Console entries of level SEVERE (errors, failed loads, CSP violations) so far."""
    return [entry for entry in driver.get_log("browser")  # type: ignore[attr-defined]
            if entry.get("level") == "SEVERE"]
