"""Every compression codec round-trips through librdkafka and through kafka-python, and
batches are stored as sent: a consumer of either library reads what the other wrote."""

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaConsumer, KafkaProducer

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def payloads(codec):
    # Compressible and incompressible values, keys and headers.
    return [(f"key-{i}".encode(), (f"{codec}-{i}-" + "x" * (i % 300)).encode() + bytes([i % 256]) * 10) for i in range(500)]


def consume_confluent(bootstrap, topic, count):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}", "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    got = []
    while len(got) < count:
        message = consumer.poll(10)
        assert message is not None, f"only {len(got)} of {count} records arrived"
        assert message.error() is None, message.error()
        got.append((message.key(), message.value(), message.headers()))
    consumer.close()
    return got


def consume_kafka_python(bootstrap, topic, count):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10_000, enable_auto_commit=False)
    consumer.assign([__import__("kafka").TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    got = []
    for record in consumer:
        got.append((record.key, record.value, list(record.headers)))
        if len(got) == count:
            break
    consumer.close()
    return got


@pytest.mark.parametrize("codec", CODECS)
def test_librdkafka_codec_round_trip(sluice, codec):
    topic = f"rd-{codec}"
    producer = Producer({"bootstrap.servers": sluice.kafka, "compression.type": codec, "linger.ms": 20})
    sent = payloads(codec)
    for key, value in sent:
        producer.produce(topic, key=key, value=value, headers=[("codec", codec.encode())])
    assert producer.flush(30) == 0
    got = consume_confluent(sluice.kafka, topic, len(sent))
    assert [(k, v) for k, v, _ in got] == sent
    assert all(h == [("codec", codec.encode())] for _, _, h in got)
    # The other library reads the same stored batches.
    other = consume_kafka_python(sluice.kafka, topic, len(sent))
    assert [(k, v) for k, v, _ in other] == sent


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_codec_round_trip(sluice, codec):
    topic = f"kp-{codec}"
    producer = KafkaProducer(bootstrap_servers=sluice.kafka, compression_type=None if codec == "none" else codec, linger_ms=20)
    sent = payloads(codec)
    for key, value in sent:
        producer.send(topic, key=key, value=value, headers=[("codec", codec.encode())])
    producer.flush()
    producer.close()
    got = consume_kafka_python(sluice.kafka, topic, len(sent))
    assert [(k, v) for k, v, _ in got] == sent
    assert all(h == [("codec", codec.encode())] for _, _, h in got)
    other = consume_confluent(sluice.kafka, topic, len(sent))
    assert [(k, v) for k, v, _ in other] == sent
