"""Queue and exchange behaviour with pika: priorities, redelivery after a consumer connection
drops, exclusive / auto-delete / expiring queues, mandatory returns, alternate exchanges,
headers exchanges, exchange-to-exchange bindings, transactions, channel-wide prefetch."""

import time

import pika
import pytest

from amqp_helpers import Collector, bodies, drain, wait_for


def test_priority_queue_delivers_highest_priority_first(connect):
    channel = connect().channel()
    channel.queue_declare("jobs", arguments={"x-max-priority": 10})
    for body, priority in ((b"low", 1), (b"urgent", 9), (b"normal", 5), (b"none", None), (b"high", 7)):
        properties = pika.BasicProperties(priority=priority) if priority is not None else None
        channel.basic_publish("", "jobs", body, properties)
    assert bodies(drain(channel, "jobs", 5)) == [b"urgent", b"high", b"normal", b"low", b"none"]


def test_each_delivery_names_its_own_exchange_routing_key_tag_and_redelivery(connect):
    """One consumer, messages through two exchanges with changing routing keys, one of them
    requeued: every basic.deliver carries that message's fields, not the previous one's."""
    connection = connect()
    channel = connection.channel()
    channel.exchange_declare("events", exchange_type="topic")
    channel.queue_declare("mixed")
    channel.queue_bind("mixed", "events", routing_key="#")
    sent = [("events", "a.b"), ("events", "a.b"), ("", "mixed"), ("events", "c"), ("events", "c.d.e")]
    for i, (exchange, key) in enumerate(sent):
        channel.basic_publish(exchange, key, f"m{i}".encode())
    collector = Collector(connection, "mixed")
    assert collector.wait(len(sent))
    got = [(m.exchange, m.routing_key, m.delivery_tag, m.redelivered, body) for m, _, body in collector.deliveries]
    assert got == [(x, k, i + 1, False, f"m{i}".encode()) for i, (x, k) in enumerate(sent)]
    # Requeue the fourth; it comes back to the same consumer, redelivered, with a new tag.
    collector.channel.basic_nack(4, requeue=True)
    assert collector.wait(len(sent) + 1)
    method, _, body = collector.deliveries[-1]
    assert (method.exchange, method.routing_key, method.delivery_tag, method.redelivered, body) == (
        "events",
        "c",
        len(sent) + 1,
        True,
        b"m3",
    )


def test_unacked_messages_of_a_dropped_consumer_are_redelivered(connect, sluice):
    channel = connect().channel()
    channel.queue_declare("orders")
    for i in range(5):
        channel.basic_publish("", "orders", f"order {i}".encode())
    doomed_connection = connect()
    doomed = Collector(doomed_connection, "orders", prefetch=3)
    assert doomed.wait(3)
    # Acknowledging one frees room for the next: it holds orders 1, 2 and 3.
    doomed.ack(doomed.deliveries[0][0])
    assert doomed.wait(4)
    assert doomed.bodies == [b"order 0", b"order 1", b"order 2", b"order 3"]
    # Drop the connection without acknowledging them (no close handshake).
    doomed_connection._impl._transport._sock.close()
    survivor = Collector(connect(), "orders", prefetch=10)
    assert survivor.wait(4)
    survivor.pump(0.3)
    got = [(body, method.redelivered) for method, _, body in survivor.deliveries]
    assert got == [
        (b"order 1", True),
        (b"order 2", True),
        (b"order 3", True),
        (b"order 4", False),
    ]


def test_basic_recover_requeues_marked_redelivered(connect):
    channel = connect().channel()
    channel.queue_declare("recoverable")
    channel.basic_publish("", "recoverable", b"again")
    method, _, _ = channel.basic_get("recoverable")
    assert method.redelivered is False
    channel.basic_recover(requeue=True)
    method, _, body = channel.basic_get("recoverable", auto_ack=True)
    assert body == b"again" and method.redelivered is True


def test_exclusive_queues_are_locked_to_their_connection_and_go_with_it(connect):
    owner = connect()
    owner_channel = owner.channel()
    owner_channel.queue_declare("mine", exclusive=True)
    intruder = connect().channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        intruder.basic_consume("mine", lambda *a: None)
    assert raised.value.reply_code == 405
    assert raised.value.reply_text.startswith(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'mine' in vhost '/'"
    )
    owner.close()
    checker = connect().channel()
    assert wait_for(lambda: _missing(checker.connection, "mine"))


def _missing(connection, queue):
    channel = connection.channel()
    try:
        channel.queue_declare(queue, passive=True)
        channel.close()
        return False
    except pika.exceptions.ChannelClosedByBroker as closed:
        return closed.reply_code == 404


def test_auto_delete_queue_goes_when_its_last_consumer_cancels(connect):
    channel = connect().channel()
    channel.queue_declare("temporary", auto_delete=True)
    tag = channel.basic_consume("temporary", lambda *a: None)
    channel.basic_cancel(tag)
    assert wait_for(lambda: _missing(channel.connection, "temporary"))


def test_unused_queue_expires(connect):
    channel = connect().channel()
    channel.queue_declare("fleeting", arguments={"x-expires": 300})
    # A passive declare counts as a use (as in RabbitMQ): look less often than it expires.
    assert wait_for(lambda: _missing(channel.connection, "fleeting"), timeout=5, step=0.6)


def test_mandatory_unroutable_messages_are_returned(connect):
    channel = connect().channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as raised:
        channel.basic_publish("", "no-such-queue", b"lost", mandatory=True)
    returned = raised.value.messages[0]
    assert returned.method.reply_code == 312
    assert returned.method.reply_text == "NO_ROUTE"
    assert returned.method.routing_key == "no-such-queue"
    assert returned.body == b"lost"
    # Without mandatory the message is dropped but still confirmed.
    channel.basic_publish("", "no-such-queue", b"dropped")


def test_alternate_exchange_catches_unroutable_messages(connect):
    channel = connect().channel()
    channel.exchange_declare("unrouted", exchange_type="fanout")
    channel.queue_declare("leftovers")
    channel.queue_bind("leftovers", "unrouted")
    channel.exchange_declare("main", exchange_type="direct", arguments={"alternate-exchange": "unrouted"})
    channel.queue_declare("known")
    channel.queue_bind("known", "main", routing_key="known")
    channel.basic_publish("main", "known", b"routed")
    channel.basic_publish("main", "unknown", b"spare")
    assert bodies(drain(channel, "known", 1)) == [b"routed"]
    assert bodies(drain(channel, "leftovers", 1)) == [b"spare"]


def test_headers_exchange_matches_all_or_any(connect):
    channel = connect().channel()
    channel.exchange_declare("docs", exchange_type="headers")
    channel.queue_declare("pdf-reports")
    channel.queue_declare("pdf-or-log")
    channel.queue_bind("pdf-reports", "docs", arguments={"x-match": "all", "format": "pdf", "type": "report"})
    channel.queue_bind("pdf-or-log", "docs", arguments={"x-match": "any", "format": "pdf", "type": "log"})
    for name, headers in (
        (b"both", {"format": "pdf", "type": "report"}),
        (b"log", {"format": "zip", "type": "log"}),
        (b"neither", {"format": "zip", "type": "report"}),
    ):
        channel.basic_publish("docs", "", name, pika.BasicProperties(headers=headers))
    assert bodies(drain(channel, "pdf-reports", 1)) == [b"both"]
    assert bodies(drain(channel, "pdf-or-log", 2)) == [b"both", b"log"]
    assert drain(channel, "pdf-reports", 1, timeout=0.3) == []


def test_exchange_to_exchange_bindings(connect):
    channel = connect().channel()
    channel.exchange_declare("source", exchange_type="fanout")
    channel.exchange_declare("sorter", exchange_type="direct")
    channel.exchange_bind("sorter", "source")
    channel.queue_declare("red")
    channel.queue_bind("red", "sorter", routing_key="red")
    channel.basic_publish("source", "red", b"via two exchanges")
    channel.basic_publish("source", "blue", b"nowhere")
    assert bodies(drain(channel, "red", 1)) == [b"via two exchanges"]
    channel.exchange_unbind("sorter", "source")
    channel.basic_publish("source", "red", b"unbound")
    assert drain(channel, "red", 1, timeout=0.3) == []


def test_cc_and_bcc_route_to_more_queues_and_bcc_is_hidden(connect):
    channel = connect().channel()
    for queue in ("to", "cc", "bcc"):
        channel.queue_declare(queue)
    channel.basic_publish("", "to", b"memo", pika.BasicProperties(headers={"CC": ["cc"], "BCC": ["bcc"]}))
    for queue in ("to", "cc", "bcc"):
        (method, properties, body), = drain(channel, queue, 1)
        assert body == b"memo"
        assert properties.headers == {"CC": ["cc"]}


def test_transactions_publish_and_acknowledge_on_commit_only(connect):
    connection = connect()
    channel = connection.channel()
    observer = connection.channel()
    channel.queue_declare("ledger")
    channel.tx_select()
    channel.basic_publish("", "ledger", b"entry 1")
    assert observer.queue_declare("ledger", passive=True).method.message_count == 0
    channel.tx_commit()
    assert observer.queue_declare("ledger", passive=True).method.message_count == 1
    channel.basic_publish("", "ledger", b"entry 2")
    channel.tx_rollback()
    method, _, body = channel.basic_get("ledger")
    assert body == b"entry 1"
    channel.basic_ack(method.delivery_tag)
    channel.tx_rollback()  # the ack is undone: the message stays unacknowledged
    channel.basic_ack(method.delivery_tag)
    channel.tx_commit()
    assert observer.queue_declare("ledger", passive=True).method.message_count == 0


def test_channel_wide_prefetch_is_shared_by_its_consumers(connect):
    connection = connect()
    setup = connection.channel()
    for queue in ("left", "right"):
        setup.queue_declare(queue)
        for i in range(3):
            setup.basic_publish("", queue, f"{queue} {i}".encode())
    channel = connection.channel()
    channel.basic_qos(prefetch_count=2, global_qos=True)
    deliveries = []
    for queue in ("left", "right"):
        channel.basic_consume(queue, lambda ch, m, p, b: deliveries.append((m, b)))
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 2
    channel.basic_ack(deliveries[0][0].delivery_tag)
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 3
    channel.basic_ack(0, multiple=True)
    deadline = time.monotonic() + 5
    while len(deliveries) < 6 and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.1)
        channel.basic_ack(0, multiple=True)
    assert sorted(b for _, b in deliveries) == sorted(
        f"{q} {i}".encode() for q in ("left", "right") for i in range(3)
    )


def test_queue_counts_purge_and_delete(connect):
    channel = connect().channel()
    declared = channel.queue_declare("counted")
    assert (declared.method.message_count, declared.method.consumer_count) == (0, 0)
    tag = channel.basic_consume("counted", lambda *a: None)
    assert channel.queue_declare("counted", passive=True).method.consumer_count == 1
    channel.basic_cancel(tag)
    channel.queue_declare("counted2")
    for i in range(4):
        channel.basic_publish("", "counted2", b"y")
    assert channel.queue_declare("counted2", passive=True).method.message_count == 4
    assert channel.queue_purge("counted2").method.message_count == 4
    assert channel.queue_declare("counted2", passive=True).method.message_count == 0
    channel.basic_publish("", "counted2", b"z")
    assert channel.queue_delete("counted2").method.message_count == 1
    # Deleting what does not exist is not an error.
    assert channel.queue_delete("counted2").method.message_count == 0
