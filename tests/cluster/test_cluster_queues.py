"""AMQP queues across a cluster of real `sluice` processes on 127.0.0.2-4.

A durable queue lives on the node the controller placed it on; a client connected to any other
node declares, publishes to, consumes from and acknowledges it through that node, as RabbitMQ
clients do with classic queues. Confirms come once the queue's node has written; a queue whose
node is down answers RabbitMQ's errors until it returns with everything it held.
"""

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pika
import pytest

from conftest import amqp_parameters
from test_cluster import FORM_TIMEOUT, live_brokers, nodes_factory, settled, wait_for  # noqa: F401

MESSAGES = 2_000
UNACKED = 100


def queue_info(node, name, vhost="/"):
    url = f"{node.http}/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name)}"
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def known_queue(node, name):
    """The queue's details on `node`, or None while it does not know the queue yet."""
    try:
        return queue_info(node, name)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def node_ids(cluster):
    """Each node's id, by its AMQP address."""
    view = wait_for("a settled cluster", lambda: settled(cluster.nodes, 3))[0]
    # Queues are placed on the nodes that answer: wait until every node sees the others.
    for node in cluster.nodes:
        wait_for("every node live", lambda: live_brokers(node) == 3)
    by_amqp = {n["amqp_addr"]: n["id"] for n in view["nodes"]}
    return [by_amqp[node.amqp] for node in cluster.nodes]


def place_on(channel, via, home_id, prefix):
    """Declares durable queues through `via` until one is placed on node `home_id`; the others
    are deleted again."""
    for i in range(40):
        name = f"{prefix}-{i}"
        channel.queue_declare(name, durable=True)
        if queue_info(via, name)["node"] == home_id:
            return name
        channel.queue_delete(name)
    raise AssertionError("no queue was placed on the wanted node in 40 declarations")


def consume(connection, name, count, prefetch=100, ack=lambda index: True):
    """Receives `count` messages from `name` and returns (bodies, redelivered flags); acks the
    ones `ack(index)` says to, leaving the others unacknowledged."""
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    bodies, flags = [], []
    for method, _properties, body in channel.consume(name, inactivity_timeout=20):
        assert method is not None, f"only {len(bodies)} of {count} messages arrived"
        if ack(len(bodies)):
            channel.basic_ack(method.delivery_tag)
        bodies.append(body.decode())
        flags.append(method.redelivered)
        if len(bodies) == count:
            break
    return channel, bodies, flags


def until(what, attempt, timeout=20.0):
    """Retries `attempt` (which may raise while a node is away) until it returns a value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except (pika.exceptions.AMQPError, OSError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {error!r}")
            time.sleep(0.5)


def test_a_queue_on_one_node_is_used_through_the_others_and_survives_restarts(nodes_factory):
    cluster = nodes_factory(3).start()
    a, b, c = cluster.nodes
    _, _, c_id = node_ids(cluster)

    publisher = pika.BlockingConnection(amqp_parameters(a))
    channel = publisher.channel()
    name = place_on(channel, a, c_id, "jobs")
    for node in cluster.nodes:
        # Every node knows the queue once it has applied the committed declaration (the
        # declaring node answered when the controller's leader had).
        wait_for(f"{node.http} to know {name}", lambda: known_queue(node, name), timeout=10)
        assert queue_info(node, name)["node"] == c_id

    # Publish through A with confirms: each confirm means node C has the message on disk.
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    for i in range(MESSAGES):
        channel.basic_publish("", name, f"m{i}".encode(), persistent, mandatory=True)
    assert queue_info(c, name)["messages_ready"] == MESSAGES
    declared = channel.queue_declare(name, passive=True)
    assert declared.method.message_count == MESSAGES, "a passive declare through A asks node C"

    # Consume through B: every message once, in order; the last UNACKED stay unacknowledged.
    consumer = pika.BlockingConnection(amqp_parameters(b))
    keep = MESSAGES - UNACKED
    _, bodies, flags = consume(consumer, name, MESSAGES, ack=lambda i: i < keep)
    assert bodies == [f"m{i}" for i in range(MESSAGES)]
    assert not any(flags)
    wait_for(
        "node C to count the acknowledgements",
        lambda: queue_info(c, name)["messages_unacknowledged"] == UNACKED
        and queue_info(c, name)["messages_ready"] == 0,
        timeout=20,
    )

    # Every node restarts while B's consumer still holds its deliveries.
    cluster.restart_all()
    wait_for("a settled cluster after the restart", lambda: settled(cluster.nodes, 3))
    assert queue_info(a, name)["node"] == c_id

    reader = pika.BlockingConnection(amqp_parameters(a))
    count = until(
        "node C to be reachable from A",
        lambda: reader.channel().queue_declare(name, passive=True).method.message_count,
    )
    assert count == UNACKED
    channel, bodies, _ = consume(reader, name, UNACKED)
    assert bodies == [f"m{i}" for i in range(keep, MESSAGES)]
    channel.cancel()
    wait_for(
        "the queue to be empty",
        lambda: queue_info(c, name)["messages"] == 0,
        timeout=20,
    )
    reader.close()

    # Node C down: its queue answers RabbitMQ's errors through A, and nothing is confirmed.
    c.stop()
    client = pika.BlockingConnection(amqp_parameters(a))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        client.channel().queue_declare(name, passive=True)
    assert closed.value.reply_code == 404 and "down or inaccessible" in closed.value.reply_text
    channel = client.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish("", name, b"lost?", persistent, mandatory=True)

    # Back: everything it held is there and usable through the other nodes.
    c.launch()
    c.wait_ready(FORM_TIMEOUT)

    def publish_again():
        channel = client.channel()
        channel.confirm_delivery()
        channel.basic_publish("", name, b"again", persistent, mandatory=True)
        return True

    until("the queue to take publishes again", publish_again)
    _, bodies, _ = consume(pika.BlockingConnection(amqp_parameters(b)), name, 1)
    assert bodies == ["again"]
    for connection in (publisher, consumer, client):
        if connection.is_open:
            try:
                connection.close()
            except Exception:
                pass


def test_what_a_killed_nodes_consumer_held_goes_to_a_consumer_on_another_node(nodes_factory):
    cluster = nodes_factory(3).start()
    a, b, c = cluster.nodes
    _, _, c_id = node_ids(cluster)
    publisher = pika.BlockingConnection(amqp_parameters(a))
    channel = publisher.channel()
    name = place_on(channel, a, c_id, "held")
    channel.confirm_delivery()
    for i in range(200):
        channel.basic_publish("", name, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))

    # A consumer on B takes 50 and acknowledges none of them, another channel on B takes 5
    # more with basic.get and acknowledges none either; then B is SIGKILLed.
    holder = pika.BlockingConnection(amqp_parameters(b))
    _, consumed, _ = consume(holder, name, 50, prefetch=50, ack=lambda i: False)
    assert consumed == [f"m{i}" for i in range(50)]
    getter = holder.channel()
    got = [getter.basic_get(name, auto_ack=False)[2].decode() for _ in range(5)]
    assert got == [f"m{i}" for i in range(50, 55)]
    held = consumed + got
    b.kill()

    # Node C notices that B is gone and requeues what B's consumer and getter held; A's
    # consumer gets every message, the held ones marked redelivered.
    reader = pika.BlockingConnection(amqp_parameters(a))
    _, bodies, flags = consume(reader, name, 200, prefetch=100)
    assert sorted(bodies, key=lambda m: int(m[1:])) == [f"m{i}" for i in range(200)]
    redelivered = {body for body, flag in zip(bodies, flags) if flag}
    assert redelivered == set(held)
    publisher.close()
    reader.close()
