"""The web console in headless Chromium: it loads, shows what the broker holds, publishes, and
manages users, permissions and virtual hosts."""

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


def test_console_shows_an_amqp_queue_and_publishes_to_it(sluice, page, connect):
    import pika

    channel = connect().channel()
    channel.queue_declare("from-amqp", durable=True)
    channel.exchange_declare("jobs", exchange_type="direct")
    channel.queue_bind("from-amqp", "jobs", routing_key="urgent")
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish("jobs", "urgent", f"job {i}".encode(), pika.BasicProperties(delivery_mode=2))
    holder = connect().channel()
    for _ in range(2):
        method, _, _ = holder.basic_get("from-amqp")  # held, not acknowledged
        assert method is not None

    login(page, sluice)
    assert page.locator(".stat", has_text="Queues").locator(".value").inner_text() == "1"
    page.click("a[data-view=queues]")
    row = page.locator("tr[data-row='//from-amqp']")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[:2] == ["/", "from-amqp"]
    assert (cells[3], cells[4]) == ("3", "2"), cells

    # The queue's page: counts, its binding, peeking, and publishing.
    row.locator("a").click()
    page.wait_for_selector("#queue-publish-form")
    assert page.locator("#queue-stats .stat", has_text="Published").locator(".value").inner_text() == "5"
    assert page.locator("td", has_text="urgent").count() == 1
    page.fill("#queue-get-count", "2")
    page.click("#queue-get-form button[type=submit]")
    page.wait_for_selector("#queue-peeked pre:has-text('job 2')")
    assert page.locator("#queue-peeked pre").all_inner_texts() == ["job 2", "job 3"]
    page.fill("#queue-publish-body", "hello from the console")
    page.click("#queue-publish-form button[type=submit]")
    page.wait_for_selector("#queue-publish-result:has-text('Published.')")

    # A pika consumer gets what is ready, the console's message last.
    consumer = connect().channel()
    received = []
    for _ in range(4):
        method, properties, body = consumer.basic_get("from-amqp", auto_ack=True)
        assert method is not None
        received.append(body)
    assert received == [b"job 2", b"job 3", b"job 4", b"hello from the console"]

    # Exchanges and connections show up too.
    page.click("a[data-view=exchanges]")
    page.locator("tr[data-row='//jobs']").wait_for()
    assert page.locator("tr[data-row='//jobs'] td").all_inner_texts()[2:] == ["direct", "", "1"]
    page.click("a[data-view=connections]")
    page.wait_for_selector("td:has-text('amqp-')")
    assert page.locator("tr[data-row^='amqp-']:not([data-row*=':'])").count() == 3  # connections
    assert page.locator("tr[data-row^='amqp-'][data-row*=':']").count() == 3  # their channels


def test_console_manages_users_permissions_and_virtual_hosts(sluice, page):
    import pika

    from conftest import amqp_parameters

    login(page, sluice)
    page.click("a[data-view=admin]")
    page.wait_for_selector("#add-vhost")
    page.fill("#new-vhost-name", "shop")
    page.click("#add-vhost button[type=submit]")
    page.locator("tr[data-row='vhost:shop']").wait_for()

    page.fill("#new-user-name", "alice")
    page.fill("#new-user-password", "s3cret")
    page.fill("#new-user-tags", "management")
    page.click("#add-user button[type=submit]")
    row = page.locator("tr[data-row='user:alice']")
    row.wait_for()
    assert row.locator("td").all_inner_texts()[:3] == ["alice", "management", "—"]

    page.select_option("#permission-user", "alice")
    page.select_option("#permission-vhost", "shop")
    page.fill("#permission-configure", "^orders")
    page.click("#set-permission button[type=submit]")
    row = page.locator("tr[data-row='permission:shop/alice']")
    row.wait_for()
    assert row.locator("td").all_inner_texts()[:5] == ["alice", "shop", "^orders", ".*", ".*"]

    # The user can now work in the virtual host, within its permissions.
    alice = pika.PlainCredentials("alice", "s3cret")
    connection = pika.BlockingConnection(amqp_parameters(sluice, credentials=alice, virtual_host="shop"))
    channel = connection.channel()
    channel.queue_declare("orders")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
        channel.queue_declare("billing")
    assert denied.value.reply_code == 403

    # A bad pattern is refused with the API's reason, shown on the page.
    page.fill("#permission-configure", "(")
    page.click("#set-permission button[type=submit]")
    page.wait_for_selector("#admin-error:not(:empty)")
    assert page.locator("#admin-error").inner_text().startswith(
        'the configure pattern "(" is not a valid regular expression: regex parse error:'
    )

    # Deleting the virtual host asks first, then closes the user's connection.
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("tr[data-row='vhost:shop'] button").click()
    page.locator("tr[data-row='vhost:shop']").wait_for(state="detached")
    assert page.locator("tr[data-row='permission:shop/alice']").count() == 0
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        for _ in range(10):
            connection.process_data_events(time_limit=1)
    assert closed.value.reply_code == 320

    page.locator("tr[data-row='user:alice'] button").click()
    page.locator("tr[data-row='user:alice']").wait_for(state="detached")


def test_console_shows_the_cluster(sluice, page):
    login(page, sluice)
    page.click("a[data-view=cluster]")
    page.wait_for_selector("tr[data-row^='node:']")
    # A node started without seeds is a cluster of one: itself, leading the controller.
    rows = page.locator("tr[data-row^='node:']")
    assert rows.count() == 1
    cells = rows.first.locator("td").all_inner_texts()
    assert cells[1] == "leader", cells
    assert cells[3] == sluice.kafka, cells
    leader = page.locator(".stat", has_text="Leader").locator(".value").inner_text()
    assert leader == cells[0], (leader, cells)
