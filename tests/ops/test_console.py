"""The web console in headless Chromium: it loads, shows what the broker holds, and publishes."""

import shutil

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by scripts/test")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by scripts/test")

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture
def page(tmp_path):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1366, "height": 800})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors in the console: {errors}"


def login(page, sluice):
    page.goto(sluice.http + "/")
    page.fill("#login-user", "guest")
    page.fill("#login-password", "guest")
    page.click("#login-submit")
    page.wait_for_selector("#throughput")


def test_console_shows_a_kafka_topic_and_publishes_to_it(sluice, page):
    producer = Producer({"bootstrap.servers": sluice.kafka})
    for i in range(7):
        producer.produce("from-kafka", key=f"k{i}", value=f"value {i}")
    assert producer.flush(30) == 0

    login(page, sluice)
    # The overview counts what is there.
    assert page.locator(".stat", has_text="Topics").locator(".value").inner_text() == "1"
    page.click("a[data-view=topics]")
    row = page.locator("tr[data-row='from-kafka']")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == "from-kafka"
    assert cells[2] == "7", cells

    # Publish from the console; a Kafka consumer receives it.
    row.locator("a").click()
    page.wait_for_selector("#publish-form")
    assert page.locator("text=value 6").count() == 1
    page.fill("#publish-key", "console-key")
    page.fill("#publish-value", "hello from the console")
    page.click("#publish-form button[type=submit]")
    page.wait_for_selector("#publish-result:has-text('Published to partition 0 at offset 7')")

    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "console-check", "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition("from-kafka", 0, 7)])
    message = consumer.poll(15)
    consumer.close()
    assert message is not None and message.error() is None
    assert (message.key(), message.value()) == (b"console-key", b"hello from the console")


def test_console_login_failure_stays_on_the_login_form(sluice, page):
    page.goto(sluice.http + "/")
    page.fill("#login-user", "guest")
    page.fill("#login-password", "wrong")
    page.click("#login-submit")
    page.wait_for_selector("#login-error:has-text('wrong')")
    assert page.locator("#app").is_hidden()
