"""A queue that cannot read one of its messages (a damaged segment) never settles it: it delivers
everything before it, stops there, keeps it across restarts, and tells the operator through the
admin API, the overview's alarms and a metric naming the queue, the file and the offset. Purging
the queue is how an operator goes on without it."""

import base64
import json
import struct
import time
import urllib.error
import urllib.request

import pika
import pytest

from amqp_helpers import parameters, wait_for

QUEUE = "damaged"
COUNT = 60
DAMAGED = 10


def http(broker, method, path):
    request = urllib.request.Request(broker.http + path, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            return response.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "null")


def metrics(broker):
    with urllib.request.urlopen(broker.http + "/metrics", timeout=30) as response:
        return response.read().decode()


def damage_message(data_dir, offset):
    """Flips a byte inside the body of the batch holding `offset` in the queue's only segment;
    returns the segment's path."""
    (queue_dir,) = [d for d in (data_dir / "queues").iterdir() if d.is_dir()]
    segment = queue_dir / "00000000000000000000.log"
    data = bytearray(segment.read_bytes())
    position = 0
    while position < len(data):
        base, length = struct.unpack(">qi", data[position:position + 12])
        end = position + 12 + length
        if base == offset:
            data[end - 20] ^= 0xFF
            segment.write_bytes(bytes(data))
            return segment
        position = end
    raise AssertionError(f"no batch starts at offset {offset}")


def consume_all(broker, settle_seconds=2.0):
    """Consumes (and acknowledges) whatever the queue delivers until it stays quiet."""
    connection = pika.BlockingConnection(parameters(broker))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    bodies = []
    for method, _, body in channel.consume(QUEUE, inactivity_timeout=settle_seconds):
        if method is None:
            break
        bodies.append(body)
        channel.basic_ack(method.delivery_tag)
    channel.cancel()
    connection.close()
    return bodies


def test_an_unreadable_message_is_kept_reported_and_blocks_only_what_follows(sluice_factory):
    broker = sluice_factory()
    connection = pika.BlockingConnection(parameters(broker))
    channel = connection.channel()
    channel.queue_declare(QUEUE, durable=True)
    channel.confirm_delivery()
    # One message per batch, about 1 KiB each: the damaged one lies well before the segment's
    # last index entry, where recovery does not look and only a read finds it.
    for n in range(COUNT):
        channel.basic_publish("", QUEUE, b"%04d" % n + b"." * 1000, pika.BasicProperties(delivery_mode=2))
    connection.close()
    broker.stop()
    segment = damage_message(broker.data_dir, DAMAGED)
    broker.start()

    assert consume_all(broker) == [b"%04d" % n + b"." * 1000 for n in range(DAMAGED)]

    status, queue = http(broker, "GET", f"/api/queues/%2F/{QUEUE}")
    assert status == 200
    unreadable = queue["unreadable"]
    assert unreadable is not None
    assert unreadable["offset"] == DAMAGED
    assert unreadable["file"] == str(segment)
    assert unreadable["position"] is not None and unreadable["position"] > 0
    assert queue["messages_ready"] == COUNT - DAMAGED
    _, overview = http(broker, "GET", "/api/overview")
    assert "unreadable_queue" in overview["totals"]["alarms"]
    text = metrics(broker)
    assert f'sluice_queue_unreadable_message{{vhost="/",queue="{QUEUE}",file="{segment}",offset="{DAMAGED}"}} 1' in text

    # basic.get gets a channel error, not an empty queue and not the message behind it.
    connection = pika.BlockingConnection(parameters(broker))
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        channel.basic_get(QUEUE, auto_ack=True)
    assert closed.value.reply_code == 404
    assert "offset 10" in closed.value.reply_text
    assert str(segment) not in closed.value.reply_text
    connection.close()

    # Nothing was settled: after a restart the queue still holds the damaged message and
    # everything behind it, and still stops at it.
    broker.restart()
    _, queue = http(broker, "GET", f"/api/queues/%2F/{QUEUE}")
    assert queue["messages_ready"] == COUNT - DAMAGED
    assert consume_all(broker, settle_seconds=1.0) == []
    assert wait_for(lambda: http(broker, "GET", f"/api/queues/%2F/{QUEUE}")[1]["unreadable"] is not None)

    # An operator purges the queue: the alarm goes with the message.
    status, _ = http(broker, "DELETE", f"/api/queues/%2F/{QUEUE}/contents")
    assert status in (200, 204)
    _, queue = http(broker, "GET", f"/api/queues/%2F/{QUEUE}")
    assert queue["unreadable"] is None
    _, overview = http(broker, "GET", "/api/overview")
    assert "unreadable_queue" not in overview["totals"]["alarms"]
    assert "sluice_queue_unreadable_message{" not in metrics(broker)
