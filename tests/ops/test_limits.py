"""Every limit a client can run into, hit with a real client: the protocol's own error comes
back (RabbitMQ's and Kafka's codes and texts), the refusal is counted in
sluice_limit_refusals_total, and the broker goes on serving."""

import json
import re
import socket
import struct
import threading
import time

import pika
import pika.exceptions
import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
from kafka import KafkaConsumer, KafkaProducer

from conftest import amqp_parameters
from conftest import run_cli as cli
from test_amqp_ops import http, metrics, sample


def refusals(broker, limit):
    return sample(metrics(broker), "sluice_limit_refusals_total", limit=limit)


def connection_refused(broker, **kwargs):
    """Opens an AMQP connection that the broker must refuse at connection.open; returns the
    code and text of its connection.close (pika reports it as a probable access denial)."""
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as refused:
        pika.BlockingConnection(amqp_parameters(broker, **kwargs))
    match = re.search(r"\((\d+)\) ['\"](.*)['\"]", str(refused.value))
    assert match, str(refused.value)
    return int(match.group(1)), match.group(2)


def still_serves_amqp(broker):
    connection = pika.BlockingConnection(amqp_parameters(broker))
    channel = connection.channel()
    channel.queue_declare("limits-health-check")
    channel.basic_publish("", "limits-health-check", b"ok")
    for _ in range(50):
        method, _, body = channel.basic_get("limits-health-check", auto_ack=True)
        if method:
            assert body == b"ok"
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the broker stopped delivering")
    connection.close()


def test_node_connection_limit(sluice_factory):
    broker = sluice_factory(env={"SLUICE_AMQP__MAX_CONNECTIONS": "3"})
    held = [pika.BlockingConnection(amqp_parameters(broker)) for _ in range(3)]
    code, text = connection_refused(broker)
    assert code == 530
    assert "connection refused: node connection limit (3) is reached" in text
    assert refusals(broker, "amqp_connections") == 1
    held.pop().close()
    still_serves_amqp(broker)
    for connection in held:
        connection.close()


def test_channel_max_is_negotiated_and_enforced(sluice_factory):
    broker = sluice_factory(env={"SLUICE_AMQP__CHANNEL_MAX": "4"})
    connection = pika.BlockingConnection(amqp_parameters(broker, channel_max=100))
    # The client asked for more; the broker's proposal wins.
    assert connection._impl.params.channel_max == 4
    for number in range(1, 5):
        connection.channel(number)
    connection.close()
    # A client that ignores the negotiated maximum is stopped with 530.
    connection = pika.BlockingConnection(amqp_parameters(broker, channel_max=100))
    connection._impl.params.channel_max = 100
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        connection.channel(5)
    assert closed.value.reply_code == 530
    assert "exceeds the negotiated channel_max (4)" in closed.value.reply_text
    assert refusals(broker, "channel_max") == 1
    still_serves_amqp(broker)


def test_consumers_per_channel(sluice_factory):
    broker = sluice_factory(env={"SLUICE_AMQP__CONSUMER_MAX_PER_CHANNEL": "2"})
    connection = pika.BlockingConnection(amqp_parameters(broker))
    channel = connection.channel()
    channel.queue_declare("many-consumers")
    channel.basic_consume("many-consumers", lambda *a: None)
    channel.basic_consume("many-consumers", lambda *a: None)
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        channel.basic_consume("many-consumers", lambda *a: None)
    assert closed.value.reply_code == 530
    assert "reached maximum (2) of consumers per channel" in closed.value.reply_text
    assert refusals(broker, "consumers_per_channel") == 1
    still_serves_amqp(broker)


def test_vhost_limits_on_connections_and_queues(sluice):
    assert http(sluice, "PUT", "/api/vhost-limits/%2F/max-connections", {"value": 2})[0] == 204
    assert http(sluice, "PUT", "/api/vhost-limits/%2F/max-queues", {"value": 3})[0] == 204
    status, body = http(sluice, "GET", "/api/vhost-limits")
    assert status == 200
    assert body == [{"vhost": "/", "value": {"max-connections": 2, "max-queues": 3}}]
    status, problem = http(sluice, "PUT", "/api/vhost-limits/%2F/max-channels", {"value": 1})
    assert status == 400 and "unknown virtual host limit" in problem["detail"]
    assert http(sluice, "PUT", "/api/vhost-limits/nowhere/max-queues", {"value": 1})[0] == 404

    first = pika.BlockingConnection(amqp_parameters(sluice))
    second = pika.BlockingConnection(amqp_parameters(sluice))
    code, text = connection_refused(sluice)
    assert code == 530
    assert text.endswith("access to vhost '/' refused for user 'guest': connection limit (2) is reached")
    assert refusals(sluice, "vhost_max_connections") == 1

    channel = first.channel()
    for name in ("q1", "q2", "q3"):
        channel.queue_declare(name)
    channel.queue_declare("q1")  # declaring an existing queue again is no new queue
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        channel.queue_declare("q4")
    assert closed.value.reply_code == 406
    assert "cannot declare queue 'q4': queue limit in vhost '/' (3) is reached" in closed.value.reply_text
    assert refusals(sluice, "vhost_max_queues") == 1
    # The connection stays; deleting a queue makes room.
    channel = first.channel()
    channel.queue_delete("q3")
    channel.queue_declare("q4")
    # The HTTP API is held to the same limit.
    status, problem = http(sluice, "PUT", "/api/queues/%2F/q5", {"durable": True})
    assert status == 400 and "queue limit in vhost '/' (3) is reached" in problem["detail"]

    # Limits are definitions: they survive a restart.
    first.close()
    second.close()
    sluice.restart()
    status, body = http(sluice, "GET", "/api/vhost-limits/%2F")
    assert body == [{"vhost": "/", "value": {"max-connections": 2, "max-queues": 3}}]
    # A negative value clears a limit, as in RabbitMQ; DELETE does too.
    assert http(sluice, "PUT", "/api/vhost-limits/%2F/max-queues", {"value": -1})[0] == 204
    assert http(sluice, "DELETE", "/api/vhost-limits/%2F/max-connections")[0] == 204
    assert http(sluice, "GET", "/api/vhost-limits")[1] == []
    connections = [pika.BlockingConnection(amqp_parameters(sluice)) for _ in range(3)]
    channel = connections[0].channel()
    channel.queue_declare("q5")
    for connection in connections:
        connection.close()


def test_user_limits_on_connections_and_channels(sluice):
    assert http(sluice, "PUT", "/api/users/app", {"password": "pw", "tags": []})[0] == 201
    assert http(sluice, "PUT", "/api/permissions/%2F/app", {"configure": ".*", "write": ".*", "read": ".*"})[0] == 204
    assert http(sluice, "PUT", "/api/user-limits/app/max-connections", {"value": 1})[0] == 204
    assert http(sluice, "PUT", "/api/user-limits/app/max-channels", {"value": 2})[0] == 204
    assert http(sluice, "GET", "/api/user-limits/app")[1] == [
        {"user": "app", "value": {"max-channels": 2, "max-connections": 1}}
    ]
    credentials = pika.PlainCredentials("app", "pw")
    connection = pika.BlockingConnection(amqp_parameters(sluice, credentials=credentials))
    code, text = connection_refused(sluice, credentials=credentials)
    assert code == 530
    assert text.endswith("connection refused for user 'app': user connection limit (1) is reached")
    assert refusals(sluice, "user_max_connections") == 1
    # Other users are not held to app's limit.
    pika.BlockingConnection(amqp_parameters(sluice)).close()

    connection.channel()
    connection.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        connection.channel()
    assert closed.value.reply_code == 530
    assert "number of channels opened for user 'app' has reached the maximum allowed user limit of (2)" in closed.value.reply_text
    assert refusals(sluice, "user_max_channels") == 1
    # The closed connection gave its place and its channels back.
    connection = pika.BlockingConnection(amqp_parameters(sluice, credentials=credentials))
    connection.channel()
    connection.channel()
    connection.close()
    # The CLI lists, sets and clears the same limits.
    listed = json.loads(cli(sluice, "limit", "list", "-o", "json").stdout)
    assert {"kind": "user", "owner": "app", "limit": "max-channels", "value": 2} in listed
    assert "set max-queues = 7 on virtual host /" in cli(sluice, "limit", "set", "--vhost", "/", "max-queues", "7").stdout
    assert http(sluice, "GET", "/api/vhost-limits/%2F")[1] == [{"vhost": "/", "value": {"max-queues": 7}}]
    cli(sluice, "limit", "clear", "--vhost", "/", "max-queues")
    assert http(sluice, "GET", "/api/vhost-limits")[1] == []
    refused = cli(sluice, "limit", "set", "--for-user", "app", "max-queues", "1", check=False)
    assert refused.returncode == 1 and "unknown user limit" in refused.stderr
    assert http(sluice, "PUT", "/api/user-limits/app/max-queues", {"value": 1})[0] == 400
    assert http(sluice, "PUT", "/api/user-limits/nobody/max-channels", {"value": 1})[0] == 404
    still_serves_amqp(sluice)


def test_partitions_per_topic_and_in_total(sluice_factory):
    broker = sluice_factory(env={
        "SLUICE_KAFKA__MAX_PARTITIONS_PER_TOPIC": "8",
        "SLUICE_KAFKA__MAX_PARTITIONS": "12",
    })
    admin = AdminClient({"bootstrap.servers": broker.kafka})

    def create(name, partitions):
        future = admin.create_topics([NewTopic(name, partitions, 1)])[name]
        return future.exception(timeout=30)

    error = create("too-wide", 9)
    assert error.args[0].code() == KafkaError.INVALID_PARTITIONS
    assert "at most 8 partitions" in error.args[0].str()
    assert create("eight", 8) is None
    error = create("five", 5)
    assert error.args[0].code() == KafkaError.POLICY_VIOLATION
    assert "at most 12 (kafka.max_partitions)" in error.args[0].str()
    assert create("four", 4) is None
    # Adding partitions is held to both limits too.
    future = admin.create_partitions([NewPartitions("four", 5)])["four"]
    assert future.exception(timeout=30).args[0].code() == KafkaError.POLICY_VIOLATION
    text = metrics(broker)
    assert sample(text, "sluice_limit_refusals_total", limit="partitions_per_topic") == 1
    assert sample(text, "sluice_limit_refusals_total", limit="partitions") == 2
    # The broker still serves the topics it has.
    producer = KafkaProducer(bootstrap_servers=broker.kafka)
    producer.send("four", b"still here", partition=3).get(timeout=30)
    producer.close()


def test_group_max_size_counts_pending_members(sluice_factory):
    # An initial rebalance delay lets both members join the first generation together: with
    # none, the first joins alone and rejoins at once for the second, and kafka-python 3.0.12
    # sometimes leaves that member's heartbeats off after its second SyncGroup (its client log
    # shows no "Enabling heartbeat"), so its session expired and the third was let in.
    broker = sluice_factory(env={
        "SLUICE_KAFKA__GROUP_MAX_SIZE": "2",
        "SLUICE_KAFKA__GROUP_INITIAL_REBALANCE_DELAY_MS": "1000",
    })
    consumers = []

    def consumer():
        c = KafkaConsumer("sized", bootstrap_servers=broker.kafka, group_id="sized-group",
                          session_timeout_ms=6000, heartbeat_interval_ms=500)
        consumers.append(c)
        return c

    # Each member polls in a thread of its own, so neither waits on the other's poll.
    stop = threading.Event()
    joined = []

    def member():
        c = consumer()
        while not stop.is_set():
            c.poll(timeout_ms=100)
            if c.assignment():
                joined.append(c)

    # Two partitions, so that both members get one once the group is formed.
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.kafka)
    admin.create_topics([NewTopic("sized", 2, 1)])
    admin.close()
    threads = [threading.Thread(target=member) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len({id(c) for c in joined}) < 2:
            time.sleep(0.1)
        third = consumer()
        from kafka.errors import GroupMaxSizeReachedError
        with pytest.raises(GroupMaxSizeReachedError):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                third.poll(timeout_ms=200)
        assert refusals(broker, "group_max_size") >= 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for c in consumers:
            c.close()


def test_one_request_in_flight_per_kafka_connection(sluice):
    """Requests pipelined on one connection are read one at a time and answered in order:
    the broker holds at most one request per connection, the rest wait in the socket."""
    host, port = sluice.kafka.rsplit(":", 1)
    count = 500
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        frames = bytearray()
        for correlation in range(count):
            # ApiVersions v0: api key 18, version 0, correlation id, client id "pipe".
            body = struct.pack(">hhih", 18, 0, correlation, 4) + b"pipe"
            frames += struct.pack(">i", len(body)) + body
        sock.sendall(frames)
        seen = []
        buffer = b""
        while len(seen) < count:
            while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">i", buffer[:4])[0]:
                chunk = sock.recv(65536)
                assert chunk, "the broker closed the connection"
                buffer += chunk
            size = struct.unpack(">i", buffer[:4])[0]
            frame, buffer = buffer[4:4 + size], buffer[4 + size:]
            seen.append(struct.unpack(">i", frame[:4])[0])
    assert seen == list(range(count))
