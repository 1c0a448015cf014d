"""Fixtures of the browser tests: ``leaseflow serve``'s app on uvicorn in a thread
(a free loopback port, the test's database and broker) and headless Chromium driven
by selenium through Debian's ``chromium-driver``. Without Chromium the tests skip on
a laptop and fail when ``CI=true``."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaseflow.api.app import create_app
from tests.conftest import missing

#: Where screenshots go (a test artefact; gitignored).
ARTIFACTS = Path(os.environ.get("LEASEFLOW_BROWSER_ARTIFACTS", Path(__file__).parent / "artifacts"))
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture
def served(settings, client) -> Iterator[str]:
    """The app served on 127.0.0.1; its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings, client), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium (selenium's WebDriver), 1440 pixels wide."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        missing("selenium", exc)
    binary = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        missing("Chromium", "install chromium and chromium-driver (apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name: str) -> Path:
    """A full-page screenshot in ``ARTIFACTS``; its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": 1440, "height": min(int(height), 4000), "deviceScaleFactor": 1}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": False})
    path = ARTIFACTS / f"{name}.png"
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path
