"""The dashboard end to end in headless Chromium: load the runs, filter, open a run,
see its graph with the current state highlighted and its step timeline, cancel a
waiting run with the button, see it cancelled. Screenshots go to ``ARTIFACTS``
(``docs/dashboard-runs.png`` and ``docs/dashboard-run.png`` are two of them)."""

from __future__ import annotations

import pytest

import tests.workflows.waits as waits
from leaseflow import messages
from tests.browser.conftest import screenshot
from tests.integration.test_parallel import drive
from tests.workflows import basic

#: How long the page may take to show what it must (seconds).
PATIENCE = 15


@pytest.fixture
def runs(client, runner) -> dict[str, str]:
    """One completed run, one failed (its retries spent) and one waiting on a Wait."""
    completed = client.start(basic.linear, {"n": 3})
    drive(runner, messages.StateStep(completed, "linear5", "s1", 1))
    failed = client.start(basic.flaky, {"fail_times": 5})
    drive(runner, messages.StateStep(failed, "flaky", "enter", 1))
    waiting = client.start(waits.approval, {})
    drive(runner, messages.StateStep(waiting, "wait_approval", "draft", 1))
    found = {run_id: client.get(run_id).status for run_id in (completed, failed, waiting)}
    assert list(found.values()) == ["completed", "failed", "waiting"], found
    return {"completed": completed, "failed": failed, "waiting": waiting}


def rows(driver) -> dict[str, str]:
    """The runs table: run id -> status (read at once: the live refresh replaces it)."""
    return driver.execute_script(
        "const out = {};"
        "document.querySelectorAll('table.runs tbody tr[data-run]')"
        ".forEach((r) => { out[r.dataset.run] = r.dataset.status; });"
        "return out;"
    )


def states(driver, selector: str) -> list[str]:
    """The ``data-state`` of the graph's nodes ``selector`` matches."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((n) => n.dataset.state);",
        selector,
    )


def texts(driver, selector: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((n) => n.textContent.trim());",
        selector,
    )


def waiter(driver):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PATIENCE, ignored_exceptions=(StaleElementReferenceException,))


def test_filter_open_and_cancel_a_waiting_run(served, browser, runs, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select

    wait = waiter(browser)
    # Given three runs: completed, failed, waiting
    # When the dashboard is loaded at /
    browser.get(served + "/")
    # Then it lists them with their counts by status
    wait.until(lambda d: len(rows(d)) == 3)
    assert rows(browser) == {run_id: status for status, run_id in runs.items()}
    assert texts(browser, ".count.status-waiting .n") == ["1"]
    screenshot(browser, "dashboard-runs")

    # When filtered on status=waiting
    Select(browser.find_element(By.NAME, "status")).select_by_value("waiting")
    browser.find_element(By.ID, "apply").click()
    # Then only the waiting run is listed
    wait.until(lambda d: "status=waiting" in d.current_url and len(rows(d)) == 1)
    assert rows(browser) == {runs["waiting"]: "waiting"}
    screenshot(browser, "dashboard-runs-waiting")

    # When the run is opened
    browser.execute_script(
        "document.querySelector(arguments[0]).click()", f"tr[data-run='{runs['waiting']}'] a"
    )
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg.graph")))
    # Then its graph highlights the current state and marks the path that led there
    assert states(browser, "svg.graph .node.current") == ["decide"]
    assert {"draft", "decide"} <= set(states(browser, "svg.graph .node.visited"))
    assert len(texts(browser, "svg.graph .edge.taken")) == 2  # entry -> draft -> decide
    # And its step timeline shows the steps with their outcomes
    steps = "table.steps tbody tr[class^='outcome-']"
    assert texts(browser, steps + " td:nth-child(2)") == ["draft", "decide"]
    assert texts(browser, steps + " td:nth-child(4)") == ["next", "wait"]
    screenshot(browser, "dashboard-run")

    # When the Cancel button is pressed and the confirmation accepted
    browser.find_element(By.CSS_SELECTOR, "button[data-action='cancel']").click()
    wait.until(ec.alert_is_present()).accept()
    # Then the page shows the run cancelled, and so does the store
    wait.until(ec.text_to_be_present_in_element((By.ID, "run-status"), "cancelled"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), "Cancel: cancelled"))
    assert client.get(runs["waiting"]).status == "cancelled"
    screenshot(browser, "dashboard-run-cancelled")


def test_a_failed_run_shows_its_traceback(served, browser, runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    # Given a run that failed after its retries
    # When its page is opened
    browser.get(f"{served}/ui/runs/{runs['failed']}")
    waiter(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "svg.graph .node.current"))
    )
    # Then the failed state is the current one and each failed attempt's error opens
    # on its traceback
    node = browser.find_element(By.CSS_SELECTOR, "svg.graph .node.current")
    assert node.get_attribute("data-state") == "shaky"
    assert "status-failed" in node.get_attribute("class")
    summaries = browser.find_elements(By.CSS_SELECTOR, "tr.error-row summary")
    assert len(summaries) == 3 and "ConnectionError" in summaries[0].text
    summaries[-1].click()
    trace = browser.find_element(By.CSS_SELECTOR, "tr.error-row details[open] pre").text
    assert "Traceback (most recent call last)" in trace
    screenshot(browser, "dashboard-run-failed")
