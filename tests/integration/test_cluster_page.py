"""The live page of the cluster in a real browser (headless Chromium through Playwright), over
three real nodes: three rows appear with the snapshot leader marked, a killed node's row turns
down within 10 s without a reload, its lag plot moves while the others write, and a row opens its
detail."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, sync_playwright

from nodes import stop_leftovers
from trio import Trio

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason=f"{CHROMIUM} missing (scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    t = Trio(tmp_path_factory.mktemp("cluster-page"), snapshots=True)
    try:
        yield t
    finally:
        t.close()
        stop_leftovers()


@pytest.fixture(autouse=True)
def _stop_leftover_nodes() -> Iterator[None]:
    # (Overrides the suite's per-test cleanup: the nodes here live for the whole module.)
    yield


@pytest.fixture(scope="module")
def page(trio: Trio) -> Iterator[Page]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            p = browser.new_page()
            p.goto(trio.url(2) + "/")
            yield p
        finally:
            browser.close()


def row(node: int) -> str:
    return f'tr.node[data-node-id="{node}"]'


def test_three_rows_appear(page: Page) -> None:
    p = page
    for node in (1, 2, 3):
        p.wait_for_selector(row(node), timeout=30_000)
    p.wait_for_function(
        "() => document.querySelectorAll('tr.node[data-state=\"healthy\"]').length === 3",
        timeout=60_000)
    # One of them holds the snapshot lease, and its row says so.
    leader = p.wait_for_selector('tr.node[data-leader="true"]', timeout=30_000)
    assert leader is not None and "leader" in leader.inner_text()
    assert len(p.query_selector_all('tr.node[data-leader="true"]')) == 1


def test_a_killed_node_turns_down_and_its_plot_moves(trio: Trio, page: Page) -> None:
    p = page
    trio.nodes[3].kill()
    killed = time.monotonic()
    p.wait_for_selector(row(3) + '[data-state="down"]', timeout=10_000)
    assert time.monotonic() - killed < 10
    plot = row(3) + " svg.lag polyline"
    before = p.get_attribute(plot, "points")
    top = p.get_attribute(row(3) + " svg.lag", "data-max")
    assert before and top == "1"  # flat: it was not behind when it died
    for i in range(20):
        trio.nodes[1].execute("INSERT INTO t VALUES (?, 'x')", (i,))
    # The others write: the down node falls behind, and its plot climbs (no reload).
    p.wait_for_function(
        "() => Number(document.querySelector('tr.node[data-node-id=\"3\"] svg.lag')"
        ".getAttribute('data-max')) > 1", timeout=20_000)
    assert p.get_attribute(plot, "points") != before
    assert "seen" in p.inner_text(row(3))


def test_a_row_opens_its_detail(page: Page) -> None:
    p = page
    p.click(row(1))
    detail = p.wait_for_selector('tr.detail[data-detail-of="1"]',
                                 timeout=5_000)
    text = detail.inner_text()
    for word in ("stream", "dead letters", "conflicts", "parked changes", "schema hash"):
        assert word in text, word
