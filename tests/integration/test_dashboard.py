"""The dashboard (/ui) in a real headless Chromium, against a real orchestrator behind an admin key.

The models are those of the demo profile (names, types, memory, aliases), each run by the fake
service, so the page shows what an operator of the demo would see without building tiny models.
Chromium and chromedriver come from Debian's packages (scripts/test.sh installs them); a
missing browser fails the test rather than skipping it, since CI counts a skip as a failure.
A screenshot is written to $AIO_TEST_ARTIFACTS (or the test's tmp_path) and test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.fakes import stand_in_nvml
from tests.integration.conftest import REPO, Orchestrator, fake_driver, fake_model

pytestmark = pytest.mark.integration

DEMO = REPO / "model-orchestrator" / "models.demo.yaml"
ADMIN = "dashboard-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
WAIT_S = 30  # a slow, shared CI machine: the page polls every 1.5 s, a fake model starts in ~2 s


def demo_profile() -> tuple[dict[str, Any], dict[str, Any]]:
    """(models, settings): the demo profile's models, each played by the fake service."""
    demo = yaml.safe_load(DEMO.read_text())
    models = {name: fake_model(name, **{key: spec[key] for key in ("type", "vram_gb", "aliases") if key in spec})
              for name, spec in demo["models"].items()}
    budgets = {key: demo["settings"][key] for key in ("gpu_memory_gb", "host_memory_gb")}
    return models, budgets


def chromium_paths() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver; "
                    "scripts/test.sh installs them)")
    return browser, driver


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # with both paths given, selenium does not look for a browser to download
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)  # no sandbox: CI runs as root in a container
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    waiting = WebDriverWait(driver, WAIT_S, ignored_exceptions=(NoSuchElementException,
                                                                StaleElementReferenceException))
    return waiting.until(condition, f"the dashboard did not show: {what}")


def cell(driver: WebDriver, model: str, field: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f'tr[data-model="{model}"] [data-field="{field}"]').text)


def button(driver: WebDriver, model: str, action: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-model="{model}"] button[data-action="{action}"]')


def shown_models(driver: WebDriver) -> set[str]:
    return {row.get_attribute("data-model") or "" for row in driver.find_elements(By.CSS_SELECTOR, "#models tr")}


def error_text(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "error-text").text)


def log_text(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "log-output").get_attribute("textContent"))


def last_log_line(orch: Orchestrator, model: str) -> str:
    lines = httpx.get(f"{orch.url}/logs/{model}?lines=1", headers=AUTH, timeout=10).text.splitlines()
    assert lines, f"{model}'s log is empty"
    return lines[-1]


def save_screenshot(driver: WebDriver, tmp_path: Path, name: str = "dashboard.png") -> Path:
    folder = Path(os.environ.get("AIO_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path)), "the screenshot could not be written"
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    shutil.copyfile(path, REPO / "test-artifacts" / name)
    return path


def log_in(driver: WebDriver, orch: Orchestrator) -> None:
    """Open the page; it must ask for the key (/status answers 401), then show data with it."""
    driver.get(orch.url + "/")  # redirected to /ui/
    wait_for(driver, lambda d: "admin key is needed" in error_text(d), "the key prompt")
    assert "needed" in (driver.find_element(By.ID, "key-form").get_attribute("class") or "")
    assert shown_models(driver) == set()
    driver.find_element(By.ID, "key-input").send_keys(ADMIN)
    driver.find_element(By.ID, "key-submit").click()
    wait_for(driver, lambda d: shown_models(d) == set(orch.models), "every model of the demo profile")
    wait_for(driver, lambda d: not d.find_element(By.ID, "error").is_displayed(), "the key prompt go away")


def test_dashboard_lists_models_follows_a_load_tails_the_log_and_unloads(
    orchestrator: Any, browser: WebDriver, tmp_path: Path
) -> None:
    models, budgets = demo_profile()
    orch = orchestrator(models, env={"AIO_ADMIN_KEYS": ADMIN}, **budgets)
    log_in(browser, orch)
    for name, spec in models.items():
        assert cell(browser, name, "type") == spec["type"]
        assert cell(browser, name, "state") == "stopped"
        for alias in spec.get("aliases", []):
            assert alias in cell(browser, name, "aliases")
    loaded = httpx.get(orch.url + "/status", headers=AUTH, timeout=10).json()["config"]
    shown = browser.find_element(By.ID, "config-line").text
    assert loaded["hash"] in shown and "(start)" in shown and str(orch.config) not in shown  # no path on the page
    browser.execute_script("window.notReloaded = true;")  # gone if the page reloads
    button(browser, "tiny-flux", "park").click()  # a stopped model cannot be parked: the page must say so
    wait_for(browser, lambda d: "park tiny-flux failed: 409" in error_text(d), "the refused park")

    model = "tiny-qwen"
    reply = httpx.post(orch.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text
    wait_for(browser, lambda d: cell(d, model, "state") == "ready", f"{model} ready")
    assert browser.execute_script("return window.notReloaded === true;"), "the page reloaded"
    assert "1.50 GB" in cell(browser, model, "gpu")  # the declared vram_gb
    assert "park tiny-flux failed" in error_text(browser)  # an action's error outlives the polls since
    browser.find_element(By.ID, "error-dismiss").click()
    wait_for(browser, lambda d: not d.find_element(By.ID, "error").is_displayed(), "the error dismissed")

    button(browser, model, "logs").click()
    last_line = last_log_line(orch, model)
    wait_for(browser, lambda d: last_line in log_text(d), f"the last line of {model}'s log")
    save_screenshot(browser, tmp_path)

    shown_before_unload = log_text(browser)
    button(browser, model, "unload").click()
    wait_for(browser, lambda d: cell(d, model, "state") == "stopped", f"{model} stopped")
    assert orch.status()[model]["state"] == "stopped"
    wait_for(browser, lambda d: d.find_element(By.ID, "notice").text == f"unload {model}: now stopped",
             "the unload's answer")
    assert not browser.find_element(By.ID, "error").is_displayed()
    # What the service wrote while stopping reaches the open log view through the follow stream.
    last_line = last_log_line(orch, model)
    assert last_line not in shown_before_unload
    wait_for(browser, lambda d: last_line in log_text(d), f"{model}'s log lines written while stopping")


def gpu_line(driver: WebDriver, index: int) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f'#gpu-devices [data-gpu="{index}"] [data-field="gpu-text"]').text)


def test_dashboard_shows_each_gpu_and_the_models_placed_on_it(
    orchestrator: Any, browser: WebDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stand-in 24 GB GPUs (tests/fakes/nvml) under the demo profile's models: the screenshot in
    docs/dashboard.png. No log is followed: its header names this machine's paths."""
    models, budgets = demo_profile()
    card = {"name": "NVIDIA GeForce RTX 4090", "total_gb": 24}
    env = {**fake_driver(tmp_path, card, card), "AIO_ADMIN_KEYS": ADMIN}
    orch = orchestrator(models, env=env, host_memory_gb=budgets["host_memory_gb"], gpu_memory_gb="auto",
                        gpu_process_overhead_gb=0, env_passthrough=["AIO_FAKE_NVML"])
    log_in(browser, orch)
    assert not browser.find_element(By.ID, "gpu-line").is_displayed()  # one line per GPU instead
    wait_for(browser, lambda d: gpu_line(d, 1) == "declared 0.00 GB, in use 0.00 GB of 24.0 GB · no models",
             "GPU 1 empty")
    requests = {"/v1/chat/completions": {"model": "tiny-qwen", "messages": [{"role": "user", "content": "hi"}]},
                "/v1/images/generations": {"model": "tiny-flux", "prompt": "a cat"}}
    for path, body in requests.items():
        reply = httpx.post(orch.url + path, headers=AUTH, timeout=60, json=body)
        assert reply.status_code == 200, reply.text
    expected = "declared 3.00 GB, in use 3.00 GB of 24.0 GB · tiny-flux, tiny-qwen"  # pack: both on GPU 0
    wait_for(browser, lambda d: gpu_line(d, 0) == expected, "both models on GPU 0")
    wait_for(browser, lambda d: cell(d, "tiny-qwen", "gpu") == "1.50 GB / 1.50 GB on GPU 0", "tiny-qwen's GPU")
    assert gpu_line(browser, 1).endswith("no models")
    save_screenshot(browser, tmp_path, "dashboard-gpus.png")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the orchestrator's
    try:
        monkeypatch.setenv("AIO_FAKE_NVML", env["AIO_FAKE_NVML"])
        stand_in_nvml.load().claim(other.pid, {1: 5 * 1024**3})
        wait_for(browser, lambda d: gpu_line(d, 1) == "declared 0.00 GB, in use 5.00 GB (others 5.00 GB) of 24.0 GB"
                 " · no models", "another program's memory on GPU 1")
    finally:
        other.kill()
        other.wait()
