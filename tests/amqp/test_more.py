"""More RabbitMQ behaviour with pika: broker-initiated consumer cancellation, single active
consumer, internal and auto-delete exchanges, server-generated names, byte-length limits and
reject-publish, and users with restricted permissions in other virtual hosts."""

import time

import pika
import pytest

from amqp_helpers import Collector, bodies, drain, parameters, wait_for


def test_deleting_a_queue_cancels_its_consumers(connect):
    connection = connect()
    channel = connection.channel()
    channel.queue_declare("doomed")
    cancelled = []
    channel._impl.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = channel.basic_consume("doomed", lambda *a: None)
    connect().channel().queue_delete("doomed")
    assert wait_for(lambda: connection.process_data_events(time_limit=0.05) or cancelled)
    assert cancelled == [tag]


def test_single_active_consumer_feeds_one_consumer_until_it_leaves(connect):
    channel = connect().channel()
    channel.queue_declare("sac", arguments={"x-single-active-consumer": True})
    first = Collector(connect(), "sac", prefetch=10)
    second = Collector(connect(), "sac", prefetch=10)
    for i in range(4):
        channel.basic_publish("", "sac", f"{i}".encode())
    assert first.wait(4)
    second.pump(0.3)
    assert first.bodies == [b"0", b"1", b"2", b"3"] and second.bodies == []
    first.ack(first.deliveries[-1][0], multiple=True)
    first.channel.basic_cancel(first.tag)
    channel.basic_publish("", "sac", b"4")
    assert second.wait(1)
    assert second.bodies == [b"4"]


def test_internal_exchanges_refuse_publishers(connect):
    channel = connect().channel()
    channel.exchange_declare("inner", exchange_type="fanout", internal=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        channel.basic_publish("inner", "", b"x")
        channel.queue_declare("", exclusive=True)
    assert raised.value.reply_code == 403
    assert raised.value.reply_text == "ACCESS_REFUSED - cannot publish to internal exchange 'inner' in vhost '/'"


def test_auto_delete_exchange_goes_with_its_last_binding(connect):
    channel = connect().channel()
    channel.exchange_declare("ephemeral", exchange_type="fanout", auto_delete=True)
    channel.queue_declare("holder")
    channel.queue_bind("holder", "ephemeral")
    channel.queue_unbind("holder", "ephemeral")
    probe = channel.connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        probe.exchange_declare("ephemeral", passive=True)
    assert raised.value.reply_code == 404


def test_max_length_bytes_and_reject_publish(connect):
    channel = connect().channel()
    channel.queue_declare("small", arguments={"x-max-length-bytes": 10})
    for body in (b"12345", b"67890", b"abcde"):
        channel.basic_publish("", "small", body)
    assert bodies(drain(channel, "small", 2)) == [b"67890", b"abcde"]
    channel.queue_declare("strict", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.confirm_delivery()
    channel.basic_publish("", "strict", b"in")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish("", "strict", b"out")
    assert bodies(drain(channel, "strict", 1)) == [b"in"]


@pytest.fixture
def restricted(sluice_factory, tmp_path):
    config = tmp_path / "users.toml"
    config.write_text(
        """
[amqp]
vhosts = ["/", "apps"]

[[amqp.users]]
name = "guest"
password = "guest"
tags = ["administrator"]
[amqp.users.permissions."/"]
configure = ".*"
write = ".*"
read = ".*"

[[amqp.users]]
name = "app"
password = "s3cret"
tags = []
[amqp.users.permissions."apps"]
configure = "^app\\\\."
write = "^(app\\\\.|amq\\\\.default)"
read = "^app\\\\."
"""
    )
    return sluice_factory(name="restricted", extra_args=["--config", str(config)])


def test_users_are_held_to_their_virtual_hosts_and_permissions(restricted):
    app = pika.PlainCredentials("app", "s3cret")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as raised:
        pika.BlockingConnection(parameters(restricted, credentials=app))
    assert "NOT_ALLOWED - access to vhost '/' refused for user 'app'" in str(raised.value)
    connection = pika.BlockingConnection(parameters(restricted, credentials=app, virtual_host="apps"))
    channel = connection.channel()
    channel.queue_declare("app.orders")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        channel.queue_declare("billing")
    assert raised.value.reply_code == 403
    assert raised.value.reply_text == (
        "ACCESS_REFUSED - configure access to queue 'billing' in vhost 'apps' refused for user 'app'"
    )
    channel = connection.channel()
    channel.basic_publish("", "app.orders", b"allowed")
    assert bodies(drain(channel, "app.orders", 1)) == [b"allowed"]
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        channel.basic_publish("amq.fanout", "", b"not allowed")
        channel.queue_declare("app.orders", passive=True)
    assert raised.value.reply_code == 403
    connection.close()
    # The guest user is defined in "/" only, and the two virtual hosts are separate.
    guest = pika.BlockingConnection(parameters(restricted))
    probe = guest.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        probe.queue_declare("app.orders", passive=True)
    guest.close()


def test_amqplain_authentication(sluice):
    # pika speaks PLAIN; AMQPLAIN is exercised through the raw handshake.
    import socket
    import struct

    host, port = sluice.amqp.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    buffer = b""
    while b"\xce" not in buffer[7:]:
        buffer += sock.recv(65536)

    def longstr(text):
        return struct.pack(">I", len(text)) + text

    response = b"\x05LOGIN" + b"S" + longstr(b"guest") + b"\x08PASSWORD" + b"S" + longstr(b"guest")
    client_properties = struct.pack(">I", 0)
    payload = (
        struct.pack(">HH", 10, 11)
        + client_properties
        + b"\x08AMQPLAIN"
        + longstr(response)
        + b"\x05en_US"
    )
    sock.sendall(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")
    reply = b""
    deadline = time.monotonic() + 5
    while len(reply) < 11 and time.monotonic() < deadline:
        reply += sock.recv(65536)
    # connection.tune (10, 30) means the login was accepted.
    assert reply[0] == 1 and struct.unpack(">HH", reply[7:11]) == (10, 30)
    sock.close()
