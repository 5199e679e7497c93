"""Resource alarms block publishers (connection.blocked) without stopping consumers; consumers
that never acknowledge are closed after the consumer timeout, as RabbitMQ does."""

import time

import pika
import pytest

from amqp_helpers import parameters


@pytest.fixture
def low_memory(sluice_factory):
    # A watermark of one byte: the memory alarm is raised from the start.
    return sluice_factory(name="alarm", env={"SLUICE_AMQP__MEMORY_HIGH_WATERMARK_BYTES": "1"})


def test_publishers_are_blocked_while_an_alarm_lasts(low_memory):
    publisher = pika.BlockingConnection(parameters(low_memory))
    events = []
    publisher.add_on_connection_blocked_callback(lambda conn, frame: events.append(frame.method))
    channel = publisher.channel()
    channel.queue_declare("blocked-q")
    channel.basic_publish("", "blocked-q", b"first")
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        publisher.process_data_events(time_limit=0.1)
    assert events, "no connection.blocked"
    assert events[0].reason == "low on memory"
    # A connection that does not publish is served as usual.
    observer = pika.BlockingConnection(parameters(low_memory))
    observed = observer.channel().queue_declare("blocked-q", passive=True)
    assert observed.method.message_count == 1
    observer.close()


@pytest.fixture
def impatient(sluice_factory):
    return sluice_factory(name="impatient", env={"SLUICE_AMQP__CONSUMER_TIMEOUT_MS": "500"})


def test_unacknowledged_deliveries_time_out_and_close_the_channel(impatient):
    connection = pika.BlockingConnection(parameters(impatient))
    channel = connection.channel()
    channel.queue_declare("slow")
    channel.basic_publish("", "slow", b"forgotten")
    reasons = []
    channel._impl.add_on_close_callback(lambda ch, reason: reasons.append(reason))
    channel.basic_consume("slow", lambda *a: None)
    deadline = time.monotonic() + 10
    while not reasons and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    assert reasons, "the channel was not closed"
    assert isinstance(reasons[0], pika.exceptions.ChannelClosedByBroker)
    assert reasons[0].reply_code == 406
    assert reasons[0].reply_text == (
        "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. "
        "Timeout value used: 500 ms. This timeout value can be configured, see consumers "
        "doc guide to learn more"
    )
    # The message went back to the queue.
    other = connection.channel()
    method, _, body = other.basic_get("slow", auto_ack=True)
    assert body == b"forgotten" and method.redelivered
    connection.close()
