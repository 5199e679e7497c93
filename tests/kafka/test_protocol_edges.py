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


def produce_v3(correlation_id, topic, batch):
    """A Produce v3 request frame, acks=1, one partition."""
    name = topic.encode()
    client_id = b"pipeline"
    header = struct.pack(">hhih", 0, 3, correlation_id, len(client_id)) + client_id
    body = struct.pack(">hhi", -1, 1, 10_000)  # no transactional id, acks=1, timeout
    body += struct.pack(">ih", 1, len(name)) + name
    body += struct.pack(">iii", 1, 0, len(batch)) + batch
    frame = header + body
    return struct.pack(">i", len(frame)) + frame


def list_offsets_latest_v1(correlation_id, topic):
    name = topic.encode()
    client_id = b"pipeline"
    header = struct.pack(">hhih", 2, 1, correlation_id, len(client_id)) + client_id
    body = struct.pack(">ii", -1, 1) + struct.pack(">h", len(name)) + name
    body += struct.pack(">iiq", 1, 0, -1)
    frame = header + body
    return struct.pack(">i", len(frame)) + frame


def test_pipelined_produce_requests_are_answered_in_order(sluice):
    """A client may send many Produce requests before reading any answer (librdkafka keeps
    several in flight). Each is answered, in request order, with consecutive offsets; a
    ListOffsets sent right behind them is answered last and sees every record."""
    from confluent_kafka.admin import NewTopic
    from kafka.record.default_records import DefaultRecordBatchBuilder

    topic = "pipelined"
    admin = AdminClient({"bootstrap.servers": sluice.kafka})
    admin.create_topics([NewTopic(topic, num_partitions=1)])["pipelined"].result(timeout=10)

    request_count = 40
    records_per_batch = 3
    frames = b""
    for request in range(request_count):
        builder = DefaultRecordBatchBuilder(
            magic=2, compression_type=0, is_transactional=False,
            producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        for record in range(records_per_batch):
            value = b"%d-%d-" % (request, record) + b"x" * 20_000
            builder.append(record, timestamp=None, key=None, value=value, headers=[])
        frames += produce_v3(100 + request, topic, bytes(builder.build()))
    frames += list_offsets_latest_v1(999, topic)
    sock = connect(sluice.kafka)
    sock.sendall(frames)

    for request in range(request_count):
        reply = read_frame(sock)
        correlation_id, topic_count, name_len = struct.unpack(">iih", reply[:10])
        assert correlation_id == 100 + request, "responses come back in request order"
        at = 10 + name_len
        partition_count, index, error, base_offset = struct.unpack(">iihq", reply[at:at + 18])
        assert (partition_count, index, error) == (1, 0, 0)
        assert base_offset == request * records_per_batch
    reply = read_frame(sock)
    correlation_id, topic_count, name_len = struct.unpack(">iih", reply[:10])
    assert correlation_id == 999
    at = 10 + name_len
    _, index, error, _timestamp, offset = struct.unpack(">iihqq", reply[at:at + 26])
    assert (index, error) == (0, 0)
    assert offset == request_count * records_per_batch
    sock.close()


def test_answer_pipelined_before_an_acks_0_produce_is_flushed(sluice):
    """A response to a request pipelined just before an acks=0 produce is sent at once, not
    left in the write buffer until the client sends something else (the acks=0 produce gets
    no answer, so the client may well send nothing else)."""
    client_id = b"acks0"
    metadata = struct.pack(">hhih", 3, 0, 7, len(client_id)) + client_id + struct.pack(">i", 0)
    produce = struct.pack(">hhih", 0, 3, 8, len(client_id)) + client_id
    produce += struct.pack(">hhii", -1, 0, 10_000, 0)  # no transactional id, acks=0, no topics
    sock = connect(sluice.kafka)
    sock.sendall(struct.pack(">i", len(metadata)) + metadata + struct.pack(">i", len(produce)) + produce)
    sock.settimeout(5)
    reply = read_frame(sock)
    assert struct.unpack(">i", reply[:4])[0] == 7
    sock.close()


def fetch_v4(correlation_id, topic, offset, max_bytes, partition_max_bytes):
    """A Fetch v4 request frame for partition 0 of `topic`, answered at once."""
    name = topic.encode()
    client_id = b"fetch-cap"
    header = struct.pack(">hhih", 1, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">iiiib", -1, 0, 0, max_bytes, 0)  # replica, max wait, min bytes, max bytes, isolation
    body += struct.pack(">ih", 1, len(name)) + name
    body += struct.pack(">iiqi", 1, 0, offset, partition_max_bytes)
    frame = header + body
    return struct.pack(">i", len(frame)) + frame


def fetched_record_bytes(reply):
    """The error code and the size of the records of the one partition in a Fetch v4 reply."""
    at = 4 + 4  # correlation id, throttle time
    _topic_count, name_len = struct.unpack(">ih", reply[at:at + 6])
    at += 6 + name_len
    _partition_count, _index, error, _hw, _lso, aborted = struct.unpack(">iihqqi", reply[at:at + 30])
    at += 30 + max(aborted, 0) * 16
    (size,) = struct.unpack(">i", reply[at:at + 4])
    return error, size


def test_fetch_never_returns_more_than_the_broker_cap(sluice_factory):
    """Fetch trusts the client only within the broker's fetch.max.bytes: a request asking for
    2 GiB per partition gets at most the cap (plus nothing: every batch here is smaller), and a
    request asking for 1 byte still gets one whole batch, so a consumer always progresses."""
    from confluent_kafka import Producer

    cap = 1 << 20
    broker = sluice_factory(env={"SLUICE_KAFKA__FETCH_MAX_BYTES": str(cap)})
    topic = "capped"
    producer = Producer({"bootstrap.servers": broker.kafka, "linger.ms": 0, "compression.type": "none"})
    value = b"v" * 100_000
    for _ in range(40):  # about 4 MB in 40 batches
        producer.produce(topic, value, partition=0)
        producer.flush(10)
    sock = connect(broker.kafka)
    sock.settimeout(10)
    huge = (1 << 31) - 1
    sock.sendall(fetch_v4(1, topic, 0, huge, huge))
    error, size = fetched_record_bytes(read_frame(sock))
    assert error == 0
    assert 0 < size <= cap, size
    sock.sendall(fetch_v4(2, topic, 0, 1, 1))
    error, size = fetched_record_bytes(read_frame(sock))
    assert error == 0
    assert 100_000 < size < 2 * 100_000, "exactly one whole batch"
    sock.close()


def test_describe_topic_partitions_pages_through_every_partition_in_name_order(sluice):
    """DescribeTopicPartitions (KIP-966): topics in name order, at most the asked number of
    partitions a page, and a cursor that resumes exactly where the page stopped."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=sluice.kafka)
    admin.create_topics([NewTopic("pages-b", 2, 1), NewTopic("pages-a", 5, 1)])
    seen = []
    cursor = None
    for _ in range(10):
        page = admin.describe_topic_partitions(["pages-b", "pages-a", "pages-missing"], response_partition_limit=3, cursor=cursor)
        for topic in page["topics"]:
            if topic["name"] == "pages-missing":
                assert topic["error_code"] == 3  # UNKNOWN_TOPIC_OR_PARTITION
                continue
            assert topic["error_code"] == 0
            seen.extend((topic["name"], p["partition_index"]) for p in topic["partitions"])
        assert sum(len(t["partitions"]) for t in page["topics"]) <= 3
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [("pages-a", i) for i in range(5)] + [("pages-b", i) for i in range(2)]
    admin.close()
