"""Topics, partitions, configs, committed offsets and producer ids survive a SIGKILL."""

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic


def test_definitions_and_offsets_survive_sigkill(sluice):
    admin = AdminClient({"bootstrap.servers": sluice.kafka})
    admin.create_topics([
        NewTopic("kept", num_partitions=4, replication_factor=1, config={"retention.ms": "3600000"}),
        NewTopic("grown", num_partitions=1, replication_factor=1),
        NewTopic("doomed", num_partitions=1, replication_factor=1),
    ])["kept"].result(30)
    admin.create_partitions([NewPartitions("grown", 3)])["grown"].result(30)
    admin.delete_topics(["doomed"])["doomed"].result(30)

    producer = Producer({"bootstrap.servers": sluice.kafka, "enable.idempotence": True})
    for i in range(400):
        producer.produce("kept", key=f"k{i % 40}", value=f"v{i}")
    assert producer.flush(30) == 0

    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "keeper", "enable.auto.commit": False})
    offsets = [TopicPartition("kept", p, 10 * (p + 1)) for p in range(4)]
    consumer.commit(offsets=offsets, asynchronous=False)
    consumer.close()

    sluice.kill_and_restart()

    admin = AdminClient({"bootstrap.servers": sluice.kafka})
    topics = admin.list_topics(timeout=30).topics
    # Besides the committed-offsets topic the broker keeps for itself.
    assert sorted(t for t in topics if t != "__consumer_offsets") == ["grown", "kept"]
    assert len(topics["kept"].partitions) == 4
    assert len(topics["grown"].partitions) == 3
    config = admin.describe_configs([ConfigResource("topic", "kept")])
    entries = list(config.values())[0].result(30)
    assert entries["retention.ms"].value == "3600000"

    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "keeper"})
    committed = consumer.committed([TopicPartition("kept", p) for p in range(4)], timeout=30)
    assert [tp.offset for tp in committed] == [10, 20, 30, 40]
    total = sum(consumer.get_watermark_offsets(TopicPartition("kept", p), timeout=30)[1] for p in range(4))
    consumer.close()
    assert total == 400

    # A new producer gets a producer id never handed out before the crash.
    producer = Producer({"bootstrap.servers": sluice.kafka, "enable.idempotence": True})
    producer.produce("kept", value="after")
    assert producer.flush(30) == 0
