"""Durability with pika: definitions survive restarts; persistent messages in durable queues
survive a restart and a SIGKILL; every confirmed message is there afterwards; acknowledged
messages never come back; segments of acknowledged messages are deleted."""

import time

import pika
import pytest

from amqp_helpers import bodies, drain, parameters, wait_for

PERSISTENT = pika.BasicProperties(delivery_mode=2)


def fresh_channel(broker):
    connection = pika.BlockingConnection(parameters(broker))
    return connection, connection.channel()


def test_definitions_survive_a_restart(sluice):
    connection, channel = fresh_channel(sluice)
    channel.exchange_declare("durable-x", exchange_type="topic", durable=True)
    channel.exchange_declare("transient-x", exchange_type="fanout", durable=False)
    channel.queue_declare("durable-q", durable=True, arguments={"x-max-length": 100})
    channel.queue_declare("transient-q", durable=False)
    channel.queue_bind("durable-q", "durable-x", routing_key="a.#")
    connection.close()

    sluice.restart()
    connection, channel = fresh_channel(sluice)
    channel.exchange_declare("durable-x", exchange_type="topic", durable=True, passive=True)
    declared = channel.queue_declare("durable-q", durable=True, arguments={"x-max-length": 100})
    assert declared.method.message_count == 0
    channel.basic_publish("durable-x", "a.b.c", b"routed after restart")
    assert bodies(drain(channel, "durable-q", 1)) == [b"routed after restart"]
    for kind, name in (("exchange", "transient-x"), ("queue", "transient-q")):
        probe = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            if kind == "exchange":
                probe.exchange_declare(name, passive=True)
            else:
                probe.queue_declare(name, passive=True)
        assert raised.value.reply_code == 404
    connection.close()


def every_property():
    return pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers={
            "text": "é",
            "int": -7,
            "big": 2**40,
            "flag": True,
            "list": [1, "two", {"three": 3}],
            "table": {"nested": {"deeper": b"bytes"}},
        },
        delivery_mode=2,
        priority=5,
        correlation_id="corr-1",
        reply_to="replies",
        expiration="600000",
        message_id="msg-1",
        timestamp=1_700_000_000,
        type="order.created",
        user_id="guest",
        app_id="shop",
        cluster_id="c1",
    )


def test_every_property_arrives_as_published_live_and_after_a_restart(sluice):
    """Deliveries send the content header a publisher sent; read back from disk after a
    restart, the same properties are encoded again. Both must give what was published."""
    connection, channel = fresh_channel(sluice)
    channel.queue_declare("props-live", durable=True)
    channel.queue_declare("props-kept", durable=True)
    sent = every_property()
    received = []
    channel.basic_consume(
        "props-live", lambda ch, m, p, b: received.append((p, b)), auto_ack=True
    )
    channel.basic_publish("", "props-live", b"live", sent)
    channel.basic_publish("", "props-kept", b"kept", sent)
    assert wait_for(lambda: connection.process_data_events(0.05) or received)
    ((properties, body),) = received
    assert body == b"live"
    assert vars(properties) == vars(sent)
    connection.close()

    assert sluice.stop() == 0
    sluice.start()
    connection, channel = fresh_channel(sluice)
    ((_, properties, body),) = drain(channel, "props-kept", 1)
    assert body == b"kept"
    assert vars(properties) == vars(sent)
    connection.close()


def test_persistent_messages_survive_a_graceful_restart(sluice):
    connection, channel = fresh_channel(sluice)
    channel.queue_declare("kept", durable=True)
    for i in range(100):
        channel.basic_publish("", "kept", f"m{i}".encode(), PERSISTENT)
    channel.queue_declare("kept", durable=True, passive=True)
    connection.close()
    assert sluice.stop() == 0
    sluice.start()
    connection, channel = fresh_channel(sluice)
    assert channel.queue_declare("kept", passive=True).method.message_count == 100
    assert bodies(drain(channel, "kept", 100)) == [f"m{i}".encode() for i in range(100)]
    connection.close()


def test_confirmed_messages_survive_sigkill_and_acked_ones_stay_gone(sluice):
    connection, channel = fresh_channel(sluice)
    channel.queue_declare("ledger", durable=True)
    channel.confirm_delivery()
    total = 400
    for i in range(total):
        # Each publish returns once the broker confirmed it: on disk.
        channel.basic_publish("", "ledger", f"entry {i}".encode(), PERSISTENT)
    # Consume and acknowledge the first half.
    consumer = connection.channel()
    consumer.basic_qos(prefetch_count=50)
    acked = []
    for method, _, body in consumer.consume("ledger", inactivity_timeout=5):
        assert method is not None
        consumer.basic_ack(method.delivery_tag)
        acked.append(body)
        if len(acked) == total // 2:
            break
    consumer.cancel()
    # A synchronous round trip after the acks: the broker has applied them.
    consumer.queue_declare("ledger", durable=True, passive=True)

    sluice.kill_and_restart()
    connection, channel = fresh_channel(sluice)
    remaining = channel.queue_declare("ledger", passive=True).method.message_count
    assert remaining == total - len(acked)
    survivors = bodies(drain(channel, "ledger", remaining))
    assert survivors == [f"entry {i}".encode() for i in range(total // 2, total)]
    assert not set(survivors) & set(acked)
    connection.close()


def test_unconfirmed_publishing_under_sigkill_loses_nothing_confirmed(sluice):
    connection, channel = fresh_channel(sluice)
    channel.queue_declare("stream-of-work", durable=True)
    channel.confirm_delivery()
    confirmed = []
    for i in range(300):
        body = f"job {i}".encode()
        channel.basic_publish("", "stream-of-work", body, PERSISTENT)
        confirmed.append(body)
    sluice.kill_and_restart()
    connection, channel = fresh_channel(sluice)
    count = channel.queue_declare("stream-of-work", passive=True).method.message_count
    assert count >= len(confirmed)
    assert set(confirmed) <= set(bodies(drain(channel, "stream-of-work", count)))
    connection.close()


@pytest.fixture
def small_segments(sluice_factory):
    return sluice_factory(
        name="segments",
        env={
            "SLUICE_AMQP__QUEUE_SEGMENT_BYTES": "65536",
            "SLUICE_STORAGE__HOUSEKEEPING_INTERVAL_MS": "200",
        },
    )


def queue_dir_bytes(broker):
    total = 0
    for path in (broker.data_dir / "queues").rglob("*.log"):
        total += path.stat().st_size
    return total


def test_acknowledged_segments_are_deleted(small_segments):
    connection, channel = fresh_channel(small_segments)
    channel.queue_declare("bulk", durable=True)
    body = b"x" * 1024
    for _ in range(2000):
        channel.basic_publish("", "bulk", body, PERSISTENT)
    channel.queue_declare("bulk", passive=True)
    full = queue_dir_bytes(small_segments)
    assert full >= 2000 * 1024
    got = 0
    channel.basic_qos(prefetch_count=500)
    for method, _, _ in channel.consume("bulk", inactivity_timeout=5):
        assert method is not None
        got += 1
        if got % 100 == 0 or got == 2000:
            channel.basic_ack(method.delivery_tag, multiple=True)
        if got == 2000:
            break
    channel.cancel()
    assert wait_for(lambda: queue_dir_bytes(small_segments) < 4 * 65536, timeout=10)
    connection.close()
