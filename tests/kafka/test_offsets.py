"""ListOffsets: earliest, latest, by timestamp (the first offset at or after it), and the
effect of DeleteRecords on the earliest offset."""

import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def test_offsets_for_times_returns_first_offset_at_or_after(sluice):
    admin = AdminClient({"bootstrap.servers": sluice.kafka})
    admin.create_topics([NewTopic("times", num_partitions=1, replication_factor=1)])["times"].result(30)
    base = int(time.time() * 1000) - 100_000
    # Ten batches of ten records with explicit timestamps base + 1000*i + j; a few codecs so
    # the broker must look inside compressed batches.
    for batch in range(10):
        codec = ["none", "lz4", "zstd", "gzip", "snappy"][batch % 5]
        producer = Producer({"bootstrap.servers": sluice.kafka, "linger.ms": 50, "compression.type": codec})
        for j in range(10):
            producer.produce("times", value=f"{batch}-{j}", timestamp=base + 1000 * batch + j)
        assert producer.flush(30) == 0

    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "times"})
    def lookup(ts):
        return consumer.offsets_for_times([TopicPartition("times", 0, ts)], timeout=30)[0].offset
    assert lookup(base - 5) == 0
    assert lookup(base) == 0
    assert lookup(base + 3) == 3                # inside the first batch
    assert lookup(base + 1000 * 4 + 7) == 47    # inside a compressed batch
    assert lookup(base + 1000 * 4 + 10) == 50   # between batches: the next batch's first record
    assert lookup(base + 1000 * 9 + 9) == 99
    assert lookup(base + 1000 * 20) == -1       # after everything: no such offset

    low, high = consumer.get_watermark_offsets(TopicPartition("times", 0), timeout=30)
    assert (low, high) == (0, 100)
    # DeleteRecords moves the earliest offset; lookups never answer below it.
    result = admin.delete_records([TopicPartition("times", 0, 42)])
    result[TopicPartition("times", 0, 42)].result(30)
    low, high = consumer.get_watermark_offsets(TopicPartition("times", 0), timeout=30)
    assert (low, high) == (42, 100)
    assert lookup(base) == 42
    consumer.close()
