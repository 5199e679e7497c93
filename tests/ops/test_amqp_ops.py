"""Operating the AMQP side: metrics after Kafka and AMQP traffic, connections listed and closed
through the admin API, and the CLI's queue, exchange, binding, virtual host, user and permission commands."""

import base64
import json
import time
import urllib.error
import urllib.request

import pika
import pytest
from confluent_kafka import Producer

from conftest import amqp_parameters
from conftest import run_cli as cli


def http(sluice, method, path, body=None, user="guest", password="guest"):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(sluice.http + path, data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            return response.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "null")


def metrics(sluice):
    with urllib.request.urlopen(sluice.http + "/metrics", timeout=30) as response:
        return response.read().decode()


def sample(text, name, **labels):
    """The value of one sample, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def test_metrics_count_kafka_records_and_amqp_messages(sluice, connect):
    records, messages = 137, 59
    producer = Producer({"bootstrap.servers": sluice.kafka})
    for i in range(records):
        producer.produce("metered", value=f"record {i}".encode(), partition=0)
    assert producer.flush(30) == 0

    channel = connect().channel()
    channel.queue_declare("metered-queue", durable=True)
    channel.confirm_delivery()
    for i in range(messages):
        channel.basic_publish("", "metered-queue", f"message {i}".encode(), pika.BasicProperties(delivery_mode=2))
    for _ in range(10):
        method, _, _ = channel.basic_get("metered-queue")
        channel.basic_ack(method.delivery_tag)

    # basic.ack has no reply: the last one may still be on its way to the queue.
    deadline = time.monotonic() + 10
    text = metrics(sluice)
    while sample(text, "sluice_queue_acked_total", vhost="/", queue="metered-queue") != 10 and time.monotonic() < deadline:
        time.sleep(0.05)
        text = metrics(sluice)
    assert sample(text, "sluice_partition_records_in_total", topic="metered", partition="0") == records
    assert sample(text, "sluice_queue_published_total", vhost="/", queue="metered-queue") == messages
    assert sample(text, "sluice_amqp_published_total") == messages
    assert sample(text, "sluice_queue_delivered_total", vhost="/", queue="metered-queue") == 10
    assert sample(text, "sluice_queue_acked_total", vhost="/", queue="metered-queue") == 10
    assert sample(text, "sluice_queue_messages_ready", vhost="/", queue="metered-queue") == messages - 10
    assert sample(text, "sluice_amqp_connections") == 1
    assert sample(text, "sluice_amqp_method_duration_seconds_count", method="queue.declare") == 1
    assert sample(text, "sluice_kafka_connections") >= 1
    assert sample(text, "sluice_alarm", resource="memory") == 0
    assert sample(text, "sluice_disk_free_bytes") > 0
    assert "sluice_fsync_duration_seconds_count" in text

    # basic.publish and the acknowledgements are timed one call in 32, each timed call counting
    # for the calls before it; the connection adds the rest every second, so counts are exact.
    def method_count(method):
        return sample(metrics(sluice), "sluice_amqp_method_duration_seconds_count", method=method)

    deadline = time.monotonic() + 5
    while method_count("basic.publish") != messages and time.monotonic() < deadline:
        time.sleep(0.1)
    assert method_count("basic.publish") == messages
    assert method_count("basic.ack") == 10
    assert sample(metrics(sluice), "sluice_amqp_method_duration_seconds_sum", method="basic.publish") > 0


def test_amqp_connections_and_channels_are_listed_and_closed_by_the_api(sluice, connect):
    connection = connect(client_properties={"connection_name": "billing-worker"})
    channel = connection.channel()
    channel.basic_qos(prefetch_count=7)
    channel.queue_declare("work")
    channel.basic_consume("work", lambda *a: None)
    second = connection.channel()
    second.confirm_delivery()

    def listed():
        status, body = http(sluice, "GET", "/api/connections")
        assert status == 200
        return [c for c in body if c["protocol"] == "amqp"]

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not listed() or listed()[0]["channels"] != 2):
        connection.process_data_events(time_limit=0.2)
    [amqp] = listed()
    assert (amqp["client_id"], amqp["user"], amqp["vhost"], amqp["channels"]) == ("billing-worker", "guest", "/", 2)

    def channels():
        status, body = http(sluice, "GET", "/api/channels")
        assert status == 200
        return {c["number"]: c for c in body}

    # Channel details are refreshed once a second.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not channels()[second.channel_number]["confirm"]:
        connection.process_data_events(time_limit=0.2)
    by_number = channels()
    assert by_number[channel.channel_number]["consumers"] == 1
    assert by_number[channel.channel_number]["prefetch"] == 7
    assert by_number[second.channel_number]["confirm"] is True

    status, _ = http(sluice, "DELETE", f"/api/connections/{amqp['id']}")
    assert status == 204
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        connection.process_data_events(time_limit=5)
        connection.process_data_events(time_limit=5)
    assert closed.value.reply_code == 320
    assert closed.value.reply_text == "CONNECTION_FORCED - Closed via management plugin"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and listed():
        time.sleep(0.05)
    assert listed() == []


def test_cli_queues_exchanges_and_bindings(sluice, connect):
    assert cli(sluice, "queue", "declare", "orders", "--argument", "x-max-length=1000").stdout.strip() == \
        "declared queue orders in / (0 messages)"
    assert cli(sluice, "exchange", "declare", "events", "--type", "topic").stdout.strip() == \
        "declared topic exchange events in /"
    assert cli(sluice, "binding", "add", "events", "orders", "--routing-key", "order.*").stdout.strip() == \
        'bound orders to events with routing key "order.*"'

    channel = connect().channel()
    for i in range(4):
        channel.basic_publish("events", "order.created", f"order {i}".encode())
    channel.basic_publish("events", "invoice.sent", b"not for orders")

    table = cli(sluice, "queue", "list").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "DURABLE", "READY", "UNACKED", "CONSUMERS"]
    assert table[1].split()[:5] == ["orders", "true", "4", "0", "0"]
    queues = json.loads(cli(sluice, "queue", "list", "--output", "json").stdout)
    assert [(q["name"], q["messages_ready"], q["arguments"]) for q in queues] == [("orders", 4, {"x-max-length": 1000})]

    exchanges = json.loads(cli(sluice, "exchange", "list", "-o", "json").stdout)
    assert {"name": "events", "type": "topic"}.items() <= next(x for x in exchanges if x["name"] == "events").items()
    listed = cli(sluice, "exchange", "list").stdout
    assert "(default)" in listed and "amq.topic" in listed
    bindings = json.loads(cli(sluice, "binding", "list", "-o", "json").stdout)
    assert [(b["source"], b["destination"], b["routing_key"]) for b in bindings] == [("events", "orders", "order.*")]

    peeked = cli(sluice, "consume", "orders", "--queue", "--requeue", "--count", "2").stdout.splitlines()
    assert peeked[0].split() == ["EXCHANGE", "ROUTING", "KEY", "REDELIVERED", "PAYLOAD"]
    assert [line.split()[-2:] for line in peeked[1:]] == [["order", "0"], ["order", "1"]]
    taken = [json.loads(line) for line in cli(sluice, "consume", "orders", "--queue", "--count", "3", "-o", "json").stdout.splitlines()]
    assert [m["payload"] for m in taken] == ["order 0", "order 1", "order 2"]

    assert cli(sluice, "queue", "purge", "orders").stdout.strip() == "purged 1 messages from queue orders"
    assert cli(sluice, "binding", "remove", "events", "orders", "-k", "order.*").stdout.strip() == \
        "removed the binding of orders to events"
    assert json.loads(cli(sluice, "binding", "list", "-o", "json").stdout) == []
    assert cli(sluice, "exchange", "delete", "events").stdout.strip() == "deleted exchange events"
    assert cli(sluice, "queue", "delete", "orders").stdout.strip() == "deleted queue orders"
    assert json.loads(cli(sluice, "queue", "list", "-o", "json").stdout) == []


def test_cli_queue_errors_are_clear(sluice):
    missing = cli(sluice, "queue", "purge", "ghost", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'error: queue "ghost" does not exist in virtual host "/"'
    reserved = cli(sluice, "queue", "declare", "amq.private", check=False)
    assert reserved.returncode == 1
    assert "reserved prefix 'amq.*'" in reserved.stderr
    bad_type = cli(sluice, "exchange", "declare", "x", "--type", "sideways", check=False)
    assert bad_type.returncode == 1
    assert "unknown exchange type 'sideways'" in bad_type.stderr
    no_vhost = cli(sluice, "queue", "list", "--vhost", "nowhere", check=False)
    assert no_vhost.returncode == 1
    assert 'virtual host "nowhere" does not exist' in no_vhost.stderr
    unbound = cli(sluice, "binding", "add", "amq.direct", "ghost", check=False)
    assert unbound.returncode == 1
    assert "no queue 'ghost' in vhost '/'" in unbound.stderr


def test_cli_users_permissions_and_virtual_hosts(sluice):
    assert "created virtual host shop" in cli(sluice, "vhost", "add", "shop").stdout
    cli(sluice, "user", "add", "alice", "--tag", "management", input="s3cret\n")
    users = json.loads(cli(sluice, "user", "list", "-o", "json").stdout)
    assert {"name": "alice", "tags": ["management"], "vhosts": []} in users
    alice = pika.PlainCredentials("alice", "s3cret")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        pika.BlockingConnection(amqp_parameters(sluice, credentials=alice, virtual_host="shop"))
    assert "NOT_ALLOWED - access to vhost 'shop' refused for user 'alice'" in str(refused.value)

    cli(sluice, "permission", "set", "alice", "--vhost", "shop", "--configure", "^orders", "--read", "^orders")
    listed = json.loads(cli(sluice, "permission", "list", "-o", "json").stdout)
    assert {"user": "alice", "vhost": "shop", "configure": "^orders", "write": ".*", "read": "^orders"} in listed
    table = cli(sluice, "permission", "list").stdout
    assert "alice" in table and "^orders" in table

    connection = pika.BlockingConnection(amqp_parameters(sluice, credentials=alice, virtual_host="shop"))
    channel = connection.channel()
    channel.queue_declare("orders", durable=True)
    channel.confirm_delivery()
    channel.basic_publish("", "orders", b"one", pika.BasicProperties(delivery_mode=2))
    consumer = connection.channel()
    consumer.basic_consume("orders", lambda ch, method, props, body: None, auto_ack=False)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
        channel.queue_declare("billing")
    assert denied.value.reply_code == 403

    vhosts = json.loads(cli(sluice, "vhost", "list", "-o", "json").stdout)
    assert any(v["name"] == "shop" and v["queues"] == 1 for v in vhosts)

    # Deleting the virtual host takes its queue and messages, its permissions, and its
    # connections (CONNECTION_FORCED, as RabbitMQ closes them).
    assert "deleted virtual host shop" in cli(sluice, "vhost", "delete", "shop").stdout
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        for _ in range(10):
            connection.process_data_events(time_limit=1)
    assert closed.value.reply_code == 320
    assert closed.value.reply_text == "CONNECTION_FORCED - vhost 'shop' is deleted"
    names = [v["name"] for v in json.loads(cli(sluice, "vhost", "list", "-o", "json").stdout)]
    assert "shop" not in names
    assert not any(p["vhost"] == "shop" for p in json.loads(cli(sluice, "permission", "list", "-o", "json").stdout))
    missing = cli(sluice, "vhost", "delete", "shop", check=False)
    assert missing.returncode == 1 and "shop" in missing.stderr

    # A virtual host created again under the name starts empty, with no permissions, and so
    # it stays across a restart.
    cli(sluice, "vhost", "add", "shop")
    sluice.restart()
    names = [v["name"] for v in json.loads(cli(sluice, "vhost", "list", "-o", "json").stdout)]
    assert "shop" in names
    status, queues = http(sluice, "GET", "/api/queues/shop")
    assert status == 200 and queues == []
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        pika.BlockingConnection(amqp_parameters(sluice, credentials=alice, virtual_host="shop"))
    assert "NOT_ALLOWED - access to vhost 'shop' refused for user 'alice'" in str(refused.value)

    assert "deleted user alice" in cli(sluice, "user", "delete", "alice").stdout
    assert "alice" not in [u["name"] for u in json.loads(cli(sluice, "user", "list", "-o", "json").stdout)]
