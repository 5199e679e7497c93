"""Dead-lettering with pika: each way a message dies (rejection, queue TTL, per-message TTL,
max-length overflow, delivery limit) reaches the dead-letter exchange with the `x-death`
history RabbitMQ writes, and the x-first-death-* / x-last-death-* headers."""

import datetime
import time

import pika

from amqp_helpers import drain


def declare_dead_letter_pair(channel, source, arguments):
    """A queue `source` dead-lettering to a fanout exchange, and the queue that collects them."""
    channel.exchange_declare("dlx", exchange_type="fanout")
    channel.queue_declare("dead")
    channel.queue_bind("dead", "dlx")
    channel.queue_declare(
        source, arguments={"x-dead-letter-exchange": "dlx", **arguments}
    )


def one_dead(channel, timeout=10.0):
    got = drain(channel, "dead", 1, timeout=timeout)
    assert len(got) == 1, "no dead letter arrived"
    return got[0]


def check_history(method, properties, queue, reason, routing_keys, count=1, exchange=""):
    headers = properties.headers
    death = headers["x-death"][0]
    assert death["queue"] == queue
    assert death["reason"] == reason
    assert death["count"] == count
    assert death["exchange"] == exchange
    assert death["routing-keys"] == routing_keys
    assert isinstance(death["time"], datetime.datetime)
    assert headers["x-first-death-queue"] == queue
    assert headers["x-first-death-reason"] == reason
    assert headers["x-first-death-exchange"] == exchange
    assert headers["x-last-death-queue"] == queue
    assert headers["x-last-death-reason"] == reason
    assert headers["x-last-death-exchange"] == exchange
    # Delivered from the dead-letter exchange, with the original routing key.
    assert method.exchange == "dlx"
    assert method.routing_key == routing_keys[0]


def test_reject_without_requeue_dead_letters_with_reason_rejected(connect):
    channel = connect().channel()
    declare_dead_letter_pair(channel, "work", {})
    channel.basic_publish("", "work", b"poison", pika.BasicProperties(headers={"app": "x"}))
    method, _, body = channel.basic_get("work")
    assert body == b"poison"
    channel.basic_reject(method.delivery_tag, requeue=False)
    method, properties, body = one_dead(channel)
    assert body == b"poison"
    assert properties.headers["app"] == "x"
    check_history(method, properties, "work", "rejected", ["work"])
    assert channel.queue_declare("work", passive=True).method.message_count == 0


def test_nack_without_requeue_dead_letters_too(connect):
    channel = connect().channel()
    declare_dead_letter_pair(channel, "work", {})
    for body in (b"a", b"b"):
        channel.basic_publish("", "work", body)
    channel.basic_qos(prefetch_count=10)
    first, _, _ = channel.basic_get("work")
    second, _, _ = channel.basic_get("work")
    channel.basic_nack(second.delivery_tag, multiple=True, requeue=False)
    dead = drain(channel, "dead", 2)
    assert sorted(body for _, _, body in dead) == [b"a", b"b"]
    for method, properties, _ in dead:
        check_history(method, properties, "work", "rejected", ["work"])


def test_queue_ttl_expires_messages_to_the_dead_letter_exchange(connect):
    channel = connect().channel()
    declare_dead_letter_pair(channel, "short-lived", {"x-message-ttl": 200})
    channel.basic_publish("", "short-lived", b"stale")
    started = time.monotonic()
    method, properties, body = one_dead(channel, timeout=5)
    assert time.monotonic() - started >= 0.15
    assert body == b"stale"
    check_history(method, properties, "short-lived", "expired", ["short-lived"])
    assert "original-expiration" not in properties.headers["x-death"][0]


def test_per_message_ttl_expires_and_records_the_original_expiration(connect):
    channel = connect().channel()
    declare_dead_letter_pair(channel, "plain", {})
    channel.basic_publish("", "plain", b"keep")
    channel.basic_publish("", "plain", b"soon", pika.BasicProperties(expiration="100"))
    # The expiring message sits behind "keep": RabbitMQ expires messages at the head only.
    time.sleep(0.4)
    assert drain(channel, "dead", 1, timeout=0.3) == []
    method, _, body = channel.basic_get("plain", auto_ack=True)
    assert body == b"keep"
    method, properties, body = one_dead(channel, timeout=5)
    assert body == b"soon"
    check_history(method, properties, "plain", "expired", ["plain"])
    assert properties.headers["x-death"][0]["original-expiration"] == "100"
    # The dead letter itself no longer expires.
    assert properties.expiration is None


def test_max_length_drops_the_oldest_with_reason_maxlen(connect):
    channel = connect().channel()
    declare_dead_letter_pair(channel, "bounded", {"x-max-length": 2})
    for body in (b"1", b"2", b"3", b"4"):
        channel.basic_publish("", "bounded", body)
    dead = drain(channel, "dead", 2)
    assert [body for _, _, body in dead] == [b"1", b"2"]
    for method, properties, _ in dead:
        check_history(method, properties, "bounded", "maxlen", ["bounded"])
    assert [b for _, _, b in drain(channel, "bounded", 2)] == [b"3", b"4"]


def test_reject_publish_dlx_refuses_and_dead_letters_the_newcomer(connect):
    channel = connect().channel()
    declare_dead_letter_pair(
        channel, "full", {"x-max-length": 1, "x-overflow": "reject-publish-dlx"}
    )
    channel.confirm_delivery()
    channel.basic_publish("", "full", b"first")
    try:
        channel.basic_publish("", "full", b"second")
        nacked = False
    except pika.exceptions.NackError:
        nacked = True
    assert nacked
    method, properties, body = one_dead(channel)
    assert body == b"second"
    check_history(method, properties, "full", "maxlen", ["full"])
    assert [b for _, _, b in drain(channel, "full", 1)] == [b"first"]


def test_delivery_limit_dead_letters_after_too_many_returns(connect):
    channel = connect().channel()
    declare_dead_letter_pair(channel, "limited", {"x-delivery-limit": 1})
    channel.basic_publish("", "limited", b"flaky")
    method, properties, body = channel.basic_get("limited")
    assert method.redelivered is False
    channel.basic_reject(method.delivery_tag, requeue=True)
    method, properties, body = channel.basic_get("limited")
    assert body == b"flaky" and method.redelivered is True
    assert properties.headers["x-delivery-count"] == 1
    channel.basic_reject(method.delivery_tag, requeue=True)
    method, properties, body = one_dead(channel)
    assert body == b"flaky"
    check_history(method, properties, "limited", "delivery_limit", ["limited"])
    assert channel.queue_declare("limited", passive=True).method.message_count == 0


def test_repeated_deaths_count_up_and_keep_the_first_death(connect):
    channel = connect().channel()
    # ping dead-letters to pong through the default exchange, and pong back to ping.
    channel.queue_declare(
        "ping",
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "pong"},
    )
    channel.queue_declare(
        "pong",
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "ping"},
    )
    channel.basic_publish("", "ping", b"ball")
    for queue in ("ping", "pong", "ping"):
        method = None
        deadline = time.monotonic() + 5
        while method is None and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue)
        assert method is not None, f"nothing in {queue}"
        channel.basic_reject(method.delivery_tag, requeue=False)
    method, properties, body = drain(channel, "pong", 1)[0]
    deaths = properties.headers["x-death"]
    assert [(d["queue"], d["reason"], d["count"]) for d in deaths] == [
        ("ping", "rejected", 2),
        ("pong", "rejected", 1),
    ]
    assert properties.headers["x-first-death-queue"] == "ping"
    assert properties.headers["x-last-death-queue"] == "ping"
    assert method.routing_key == "pong"
