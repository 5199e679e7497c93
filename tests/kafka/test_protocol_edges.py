"""Protocol edges over a raw socket: the ApiVersions fallback, oversized and malformed frames.
Bad input closes that one connection; the broker keeps serving everyone else."""

import socket
import struct

from confluent_kafka.admin import AdminClient


def connect(address):
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def read_frame(sock):
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    return recv_exact(sock, size)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def is_closed(sock):
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def broker_still_serves(address):
    metadata = AdminClient({"bootstrap.servers": address}).list_topics(timeout=10)
    assert len(metadata.brokers) == 1


def test_too_new_api_versions_gets_v0_reply_with_error_35_and_full_list(sluice):
    sock = connect(sluice.kafka)
    client_id = b"edge"
    body = struct.pack(">hhih", 18, 99, 1234, len(client_id)) + client_id
    sock.sendall(struct.pack(">i", len(body)) + body)
    reply = read_frame(sock)
    correlation_id, error_code, count = struct.unpack(">ihi", reply[:10])
    assert correlation_id == 1234
    assert error_code == 35
    apis = {}
    for i in range(count):
        key, low, high = struct.unpack(">hhh", reply[10 + 6 * i:16 + 6 * i])
        apis[key] = (low, high)
    assert apis[0][0] == 3      # Produce from v3
    assert apis[1][0] == 4      # Fetch from v4
    assert 18 in apis and 3 in apis
    sock.close()


def test_oversized_frame_is_refused_before_it_is_read(sluice):
    sock = connect(sluice.kafka)
    # Claims 1 GiB; nothing else is sent. The broker must close at once, not wait for it.
    sock.sendall(struct.pack(">i", 1 << 30))
    assert is_closed(sock)
    sock = connect(sluice.kafka)
    sock.sendall(struct.pack(">i", -5))
    assert is_closed(sock)
    broker_still_serves(sluice.kafka)


def test_malformed_frames_close_only_their_connection(sluice):
    healthy = connect(sluice.kafka)
    for junk in [
        b"\x00\x00",                                       # shorter than a header
        b"\x7f\x7f\x00\x00\x00\x00\x00\x01",               # unknown API key
        b"\x00\x03\x00\x00\x00\x00\x00\x07\x00\x00\x03\x3c\x0c\x00\xb6",  # Metadata claiming 54M topics
        b"\x00\x00\x00\x09\x00\x00\x00\x01\xff\xff" + b"\xff" * 40,      # Produce v9 garbage body
    ]:
        sock = connect(sluice.kafka)
        sock.sendall(struct.pack(">i", len(junk)) + junk)
        assert is_closed(sock), junk
    # The connection that behaved is still usable.
    body = struct.pack(">hhih", 18, 0, 5, -1)
    healthy.sendall(struct.pack(">i", len(body)) + body)
    correlation_id, error_code = struct.unpack(">ih", read_frame(healthy)[:6])
    assert (correlation_id, error_code) == (5, 0)
    broker_still_serves(sluice.kafka)
