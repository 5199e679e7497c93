"""Every misuse gets the exception RabbitMQ sends, with RabbitMQ's reply text: channel errors
(404, 405, 406, 403) close the channel only; connection errors (530, 503, 501-505) close the
connection. Authentication failures and access to virtual hosts too."""

import socket
import struct
import time

import pika
import pytest

from amqp_helpers import parameters


def channel_error(channel, action):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        action(channel)
        # Asynchronous methods fail on the next round trip.
        channel.queue_declare("", exclusive=True)
    return raised.value.reply_code, raised.value.reply_text


def test_channel_errors_have_rabbitmq_codes_and_texts(connect):
    connection = connect()
    setup = connection.channel()
    setup.queue_declare("durable-q", durable=True)
    setup.exchange_declare("typed", exchange_type="direct")

    cases = [
        (
            lambda ch: ch.queue_declare("nope", passive=True),
            404,
            "NOT_FOUND - no queue 'nope' in vhost '/'",
        ),
        (
            lambda ch: ch.exchange_declare("nope-x", passive=True),
            404,
            "NOT_FOUND - no exchange 'nope-x' in vhost '/'",
        ),
        (
            lambda ch: ch.basic_publish("nope-x", "k", b"x"),
            404,
            "NOT_FOUND - no exchange 'nope-x' in vhost '/'",
        ),
        (
            lambda ch: ch.queue_declare("durable-q", durable=False),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'durable-q' in vhost '/': received 'false' but current is 'true'",
        ),
        (
            lambda ch: ch.queue_declare("durable-q", durable=True, arguments={"x-max-length": 5}),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'durable-q' in vhost '/': received the value '5' of type 'signedint' but current is none",
        ),
        (
            lambda ch: ch.exchange_declare("typed", exchange_type="fanout"),
            406,
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'typed' in vhost '/': received 'fanout' but current is 'direct'",
        ),
        (
            lambda ch: ch.basic_ack(42),
            406,
            "PRECONDITION_FAILED - unknown delivery tag 42",
        ),
        (
            lambda ch: ch.queue_declare("amq.mine"),
            403,
            "ACCESS_REFUSED - queue name 'amq.mine' contains reserved prefix 'amq.*'",
        ),
        (
            lambda ch: ch.exchange_declare("amq.mine", exchange_type="direct"),
            403,
            "ACCESS_REFUSED - exchange name 'amq.mine' contains reserved prefix 'amq.*'",
        ),
        (
            lambda ch: ch.exchange_delete("amq.direct"),
            403,
            "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
        ),
        (
            lambda ch: ch.queue_bind("durable-q", ""),
            403,
            "ACCESS_REFUSED - operation not permitted on the default exchange",
        ),
        (
            lambda ch: ch.queue_declare("bad-ttl", arguments={"x-message-ttl": -1}),
            406,
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'bad-ttl' in vhost '/': {value_negative,-1}",
        ),
        (
            lambda ch: ch.basic_publish("", "durable-q", b"x", pika.BasicProperties(expiration="-5")),
            406,
            "PRECONDITION_FAILED - invalid expiration '-5': {value_negative,-5}",
        ),
    ]
    for action, code, text in cases:
        assert channel_error(connection.channel(), action) == (code, text)
    # The connection survived every channel error.
    assert connection.is_open


def test_delete_if_unused_and_if_empty(connect):
    connection = connect()
    channel = connection.channel()
    channel.queue_declare("busy")
    channel.basic_consume("busy", lambda *a: None)
    assert channel_error(connection.channel(), lambda ch: ch.queue_delete("busy", if_unused=True)) == (
        406,
        "PRECONDITION_FAILED - queue 'busy' in vhost '/' in use",
    )
    channel.queue_declare("full")
    channel.basic_publish("", "full", b"x")
    assert channel_error(connection.channel(), lambda ch: ch.queue_delete("full", if_empty=True)) == (
        406,
        "PRECONDITION_FAILED - queue 'full' in vhost '/' not empty",
    )
    channel.exchange_declare("bound", exchange_type="fanout")
    channel.queue_bind("full", "bound")
    assert channel_error(connection.channel(), lambda ch: ch.exchange_delete("bound", if_unused=True)) == (
        406,
        "PRECONDITION_FAILED - exchange 'bound' in vhost '/' in use",
    )


def test_exclusive_consume_conflicts(connect):
    connection = connect()
    channel = connection.channel()
    channel.queue_declare("solo")
    channel.basic_consume("solo", lambda *a: None, exclusive=True)
    assert channel_error(connection.channel(), lambda ch: ch.basic_consume("solo", lambda *a: None)) == (
        403,
        "ACCESS_REFUSED - queue 'solo' in vhost '/' in exclusive use",
    )


def test_unknown_exchange_type_closes_the_connection(connect):
    channel = connect().channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as raised:
        channel.exchange_declare("odd", exchange_type="x-no-such-type")
    assert raised.value.reply_code == 503
    assert raised.value.reply_text == "COMMAND_INVALID - unknown exchange type 'x-no-such-type'"


def test_wrong_password_is_refused(sluice):
    params = parameters(sluice, credentials=pika.PlainCredentials("guest", "wrong"))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as raised:
        pika.BlockingConnection(params)
    assert "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN" in str(raised.value)


def test_unknown_virtual_host_is_not_allowed(sluice):
    params = parameters(sluice, virtual_host="nowhere")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as raised:
        pika.BlockingConnection(params)
    assert "NOT_ALLOWED - vhost nowhere not found" in str(raised.value)


def frame(kind, channel, payload):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def raw_connection(sluice):
    host, port = sluice.amqp.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_until_closed(sock, limit=1 << 20):
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def test_a_wrong_protocol_header_gets_ours_back(sluice):
    sock = raw_connection(sluice)
    sock.sendall(b"AMQP\x01\x01\x00\x0a")
    assert read_until_closed(sock) == b"AMQP\x00\x00\x09\x01"
    sock = raw_connection(sluice)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert read_until_closed(sock) == b"AMQP\x00\x00\x09\x01"


def test_malformed_and_oversized_frames_close_the_connection_and_nothing_else(sluice, connect):
    for garbage in (
        frame(1, 0, b"\x00\x0a\x00\x0b" + b"\xff" * 40),  # start-ok with nonsense fields
        struct.pack(">BHI", 1, 0, 0x7FFFFFFF),  # a 2 GiB frame header
        frame(1, 0, b"\x00"),  # a method frame too short for its ids
        b"\x63" * 64,  # no frame at all
        frame(4, 0, b""),  # unknown frame type
    ):
        sock = raw_connection(sluice)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        time.sleep(0.05)
        sock.sendall(garbage)
        read_until_closed(sock)
        sock.close()
    # The broker is still serving.
    channel = connect().channel()
    channel.queue_declare("still-here")
    assert sluice.process.poll() is None


def test_deeply_nested_tables_are_refused_without_harm(sluice, connect):
    conn = connect()
    channel = conn.channel()
    table = struct.pack(">I", 0)
    for _ in range(20_000):
        entry = b"\x01aF" + table
        table = struct.pack(">I", len(entry)) + entry
    # queue.declare on channel 1 with these arguments, written straight to the socket.
    payload = struct.pack(">HHH", 50, 10, 0) + b"\x01q" + b"\x00" + table
    sock = raw_connection(sluice)
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    sock.sendall(frame(1, 1, payload))
    read_until_closed(sock)
    channel.queue_declare("after-the-attack")
    assert sluice.process.poll() is None
