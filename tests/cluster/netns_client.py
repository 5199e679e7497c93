"""Kafka clients a test runs inside one of its network namespaces (`ip netns exec`).

produce BOOTSTRAP TOPIC TAG OUTPUT STOP_FILE MAX_SECONDS [PARTITION]
    An idempotent acks=all producer sending `<tag>-<n>` to one partition (default 0), one
    record every few milliseconds, until the stop file appears or its time runs out. Writes one JSON line per
    delivery report: {"value", "offset", "at"} when acknowledged, {"value", "error", "at"} when
    not (`at`: the wall-clock time of the report), and {"fatal": [...]} if the producer failed.
read BOOTSTRAP TOPIC END OUTPUT [PARTITION]
    Reads a partition (default 0) from offset 0 up to END and writes [[value, offset], ...].
consume BOOTSTRAP TOPIC GROUP OUTPUT STOP_FILE
    A consumer group member reading the topic until the stop file appears, committing every
    second. Writes {"value", "partition", "offset"} per record and {"committed": {partition:
    offset}, "at"} after each commit it saw succeed.
"""

import json
import os
import sys
import time


def produce(bootstrap, topic, tag, output, stop_file, max_seconds, partition="0"):
    from confluent_kafka import Producer

    deadline = time.monotonic() + float(max_seconds)
    out = open(output, "w", buffering=1)
    fatal = []

    def delivered(error, message):
        line = {"value": message.value().decode(), "at": time.time()}
        if error is None:
            line["offset"] = message.offset()
        else:
            line["error"] = error.name()
        out.write(json.dumps(line) + "\n")

    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
        "linger.ms": 2, "message.timeout.ms": 15000, "request.timeout.ms": 5000,
        "socket.timeout.ms": 5000, "topic.metadata.refresh.interval.ms": 1000,
        "error_cb": lambda e: fatal.append(str(e)) if e.fatal() else None,
        **({"debug": os.environ["NETNS_CLIENT_DEBUG"]} if os.environ.get("NETNS_CLIENT_DEBUG") else {}),
    })
    # While a file named `pause` is beside the stop file, nothing is sent (scripts/chaos
    # --quiet lets the partitions go idle).
    pause_file = os.path.join(os.path.dirname(stop_file), "pause")
    n = 0
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        if os.path.exists(pause_file):
            producer.poll(0.01)
            continue
        try:
            producer.produce(topic, value=f"{tag}-{n}".encode(), partition=int(partition),
                             on_delivery=delivered)
            n += 1
        except BufferError:
            pass
        producer.poll(0.005)
    producer.flush(30)
    if fatal:
        out.write(json.dumps({"fatal": fatal}) + "\n")
    out.close()


def read(bootstrap, topic, end, output, partition="0"):
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    end = int(end)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "netns-reader",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "auto.offset.reset": "earliest"})  # from the log start, if trimmed
    consumer.assign([TopicPartition(topic, int(partition), 0)])
    records = []
    deadline = time.monotonic() + 60
    position = 0
    while position < end and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            if message.error().code() != KafkaError._PARTITION_EOF:
                raise SystemExit(f"read failed: {message.error()}")
            # Raft's own control batches take offsets no record has: the end of the
            # partition says when everything below END was read.
            position = max(position, message.offset())
            continue
        records.append([message.value().decode(), message.offset()])
        position = message.offset() + 1
    consumer.close()
    with open(output, "w") as out:
        json.dump(records, out)


def consume(bootstrap, topic, group, output, stop_file):
    from confluent_kafka import Consumer, KafkaException

    out = open(output, "w", buffering=1)

    def committed(error, partitions):
        if error is None:
            offsets = {p.partition: p.offset for p in partitions if p.error is None and p.offset >= 0}
            out.write(json.dumps({"committed": offsets, "at": time.time()}) + "\n")

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": 10000, "on_commit": committed})
    consumer.subscribe([topic])
    last_commit = time.monotonic()
    while not os.path.exists(stop_file):
        message = consumer.poll(0.2)
        if message is not None and not message.error():
            out.write(json.dumps({"value": message.value().decode(), "partition": message.partition(),
                                  "offset": message.offset()}) + "\n")
        if time.monotonic() - last_commit > 1:
            last_commit = time.monotonic()
            try:
                # Synchronous: each commit is answered before the next is sent, so the order of
                # the answers is the order of the coordinator's state (asynchronous commits sent
                # to a frozen coordinator and its successor may be answered out of order).
                consumer.commit(asynchronous=False)
            except KafkaException:
                pass  # nothing to commit yet, or no coordinator now: the next second tries again
    consumer.close()
    out.close()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"produce": produce, "read": read, "consume": consume}[mode](*args)
