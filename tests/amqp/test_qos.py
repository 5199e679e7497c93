"""basic.qos as each kind of client means it.

RabbitMQ's reading, for pika and the rest: `global=False` is a prefetch for each consumer created
from then on (and lifts a channel-wide limit), `global=True` a limit shared by the channel's
consumers, existing ones included. The specification's reading, for clients built on py-amqp
(kombu, Celery), which assume it of any server that is not RabbitMQ 3.x: `global=False` is the
shared channel limit, applying at once to the consumers already there.

A full channel-wide limit pauses its consumers: their queues stop offering them messages rather
than having deliveries handed back over and over."""

import base64
import json
import time
import urllib.request

import amqp
import pika

from amqp_helpers import parameters


def queue_counters(broker, name):
    request = urllib.request.Request(f"{broker.http}/api/queues/%2F/{name}")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def fill(channel, queue, count):
    channel.queue_declare(queue)
    for i in range(count):
        channel.basic_publish("", queue, f"{queue} {i}".encode())


def test_a_full_channel_limit_pauses_its_consumer_instead_of_bouncing_deliveries(sluice):
    connection = pika.BlockingConnection(parameters(sluice))
    channel = connection.channel()
    fill(channel, "held", 10)
    channel.basic_qos(prefetch_count=2, global_qos=True)
    deliveries = []
    channel.basic_consume("held", lambda ch, m, p, b: deliveries.append(m))
    connection.process_data_events(time_limit=1.0)
    assert len(deliveries) == 2
    # Deliveries the queue sent before the channel filled up come back to it once; then the
    # queue stops offering the paused consumer messages. A delivery handed back over and over
    # would be counted again every time it went round.
    settled = queue_counters(sluice, "held")["delivered"]
    assert settled <= 10
    connection.process_data_events(time_limit=1.0)
    assert queue_counters(sluice, "held")["delivered"] == settled
    channel.basic_ack(deliveries[0].delivery_tag)
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 3
    # Raising the limit resumes the consumer at once, without an acknowledgement.
    channel.basic_qos(prefetch_count=5, global_qos=True)
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 6
    connection.close()


def test_pika_gets_rabbitmqs_reading(sluice):
    connection = pika.BlockingConnection(parameters(sluice))
    channel = connection.channel()
    fill(channel, "per-consumer", 10)
    channel.basic_qos(prefetch_count=2)
    deliveries = []
    channel.basic_consume("per-consumer", lambda ch, m, p, b: deliveries.append(m))
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 2
    # A later per-consumer prefetch is for consumers created from now on, as in RabbitMQ.
    channel.basic_qos(prefetch_count=5)
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 2
    connection.close()

    # A per-consumer prefetch lifts a channel-wide one, as in RabbitMQ.
    connection = pika.BlockingConnection(parameters(sluice))
    channel = connection.channel()
    fill(channel, "lifted", 10)
    channel.basic_qos(prefetch_count=2, global_qos=True)
    channel.basic_qos(prefetch_count=5, global_qos=False)
    deliveries = []
    channel.basic_consume("lifted", lambda ch, m, p, b: deliveries.append(m))
    connection.process_data_events(time_limit=0.5)
    assert len(deliveries) == 5
    connection.close()


def test_py_amqp_gets_the_specifications_reading(sluice):
    host, port = sluice.amqp.rsplit(":", 1)
    connection = amqp.Connection(host=f"{host}:{port}", userid="guest", password="guest", virtual_host="/")
    connection.connect()
    channel = connection.channel()
    channel.queue_declare("spec", auto_delete=False)
    for i in range(10):
        channel.basic_publish(amqp.Message(f"spec {i}"), routing_key="spec")
    channel.queue_declare("spec-other", auto_delete=False)
    for i in range(4):
        channel.basic_publish(amqp.Message(f"other {i}"), routing_key="spec-other")
    channel.basic_qos(0, 2, False)
    received = []
    channel.basic_consume("spec", callback=received.append)
    channel.basic_consume("spec-other", callback=received.append)

    def drain(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.1)
            except TimeoutError:
                pass

    drain(0.5)
    # One limit shared by both consumers of the channel.
    assert len(received) == 2
    # Raised while consuming (as Celery does while it holds ETA tasks): it applies at once.
    channel.basic_qos(0, 5, False)
    drain(0.5)
    assert len(received) == 5
    channel.basic_ack(received[0].delivery_tag)
    drain(0.5)
    assert len(received) == 6
    connection.close()
