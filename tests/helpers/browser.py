"""Headless Chromium for the web demo's tests: Debian's chromium and chromedriver, driven by Selenium.

The machine has no network beyond the package registries, so Chromium is started with
everything that would phone home switched off, and a fresh profile each time.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1000,720"]
WEB_DIR = Path(__file__).resolve().parents[2] / "export" / "web"


def why_not() -> str | None:
    """Why the browser tests cannot run here (with the fix), or None when they can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} not found. Fix: apt-get install -y chromium chromium-driver"
    if not (WEB_DIR / "node_modules" / "onnxruntime-web" / "package.json").is_file():
        return "onnxruntime-web is not installed. Fix: npm ci --prefix export/web"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed. Fix: pip install selenium"
    return None


@contextlib.contextmanager
def chromium(profile: Path):
    """A Selenium WebDriver for a headless Chromium with its own profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path given too, Selenium downloads nothing
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def call(driver, body: str, *args, timeout: float = 120):
    """Run `body` as an async JavaScript function of `args` in the page; its value, or the page's error."""
    driver.set_script_timeout(timeout)
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async (...args) => {{ {body} }})(...Array.from(arguments).slice(0, -1))"
        ".then((value) => done({value}), (error) => done({error: String(error && error.message || error)}));",
        *args)
    if "error" in result:
        raise AssertionError(f"the page failed: {result['error']}")
    return result.get("value")
