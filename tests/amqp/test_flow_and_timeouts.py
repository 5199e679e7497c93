"""Resource alarms block publishers (connection.blocked) without stopping consumers; consumers
that never acknowledge are closed after the consumer timeout; heartbeats are sent to a quiet
client and a silent one is disconnected, as RabbitMQ does."""

import socket
import struct
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


def _frame(kind, channel, payload):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def _method(class_id, method_id, arguments):
    return _frame(1, 0, struct.pack(">HH", class_id, method_id) + arguments)


def _short(text):
    return bytes([len(text)]) + text


class RawConnection:
    """A connection speaking AMQP frames itself, to control exactly when it sends."""

    def __init__(self, sluice, heartbeat):
        host, port = sluice.amqp.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        assert self.next_frame()[:3] == (1, 10, 10)  # connection.start
        response = b"\x00guest\x00guest"
        start_ok = (
            struct.pack(">I", 0)  # no client properties
            + _short(b"PLAIN")
            + struct.pack(">I", len(response))
            + response
            + _short(b"en_US")
        )
        self.sock.sendall(_method(10, 11, start_ok))
        assert self.next_frame()[:3] == (1, 10, 30)  # connection.tune
        self.sock.sendall(_method(10, 31, struct.pack(">HIH", 2047, 131072, heartbeat)))
        self.sock.sendall(_method(10, 40, _short(b"/") + _short(b"") + b"\x00"))
        assert self.next_frame()[:3] == (1, 10, 41)  # connection.open-ok

    def next_frame(self):
        """(type, class, method) of the next frame, (8, None, None) for a heartbeat, None at EOF."""
        while True:
            if len(self.buffer) >= 7:
                kind, _, size = struct.unpack(">BHI", self.buffer[:7])
                if len(self.buffer) >= 8 + size:
                    payload = self.buffer[7 : 7 + size]
                    self.buffer = self.buffer[8 + size :]
                    if kind == 1:
                        return (kind,) + struct.unpack(">HH", payload[:4])
                    return (kind, None, None)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk


def test_heartbeats_are_sent_to_a_quiet_client_and_a_silent_one_is_closed(sluice):
    connection = RawConnection(sluice, heartbeat=1)
    opened = time.monotonic()
    heartbeats = 0
    while (frame := connection.next_frame()) is not None:
        assert frame == (8, None, None), frame
        heartbeats += 1
    closed_after = time.monotonic() - opened
    # Silent for more than two intervals: the broker closes the socket, as RabbitMQ does,
    # having sent its own heartbeats meanwhile.
    assert heartbeats >= 1
    assert 1.5 <= closed_after < 6, closed_after


def test_a_client_that_sends_heartbeats_is_kept(sluice):
    connection = RawConnection(sluice, heartbeat=1)
    connection.sock.settimeout(0.3)
    deadline = time.monotonic() + 4
    heartbeats = 0
    while time.monotonic() < deadline:
        connection.sock.sendall(_frame(8, 0, b""))
        try:
            frame = connection.next_frame()
        except socket.timeout:
            continue
        assert frame == (8, None, None), f"connection ended: {frame}"
        heartbeats += 1
    # Still open: a channel opens.
    connection.sock.settimeout(5)
    connection.sock.sendall(_frame(1, 1, struct.pack(">HH", 20, 10) + _short(b"")))
    while (frame := connection.next_frame()) == (8, None, None):
        pass
    assert frame == (1, 20, 11)  # channel.open-ok
    assert heartbeats >= 1
    connection.sock.close()
