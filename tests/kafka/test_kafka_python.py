"""kafka-python against Sluice: the example from the original documents, and more."""

import json

import kafka
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic, NewPartitions, ConfigResource, ConfigResourceType
from kafka.errors import TopicAlreadyExistsError, InvalidTopicError, UnknownTopicOrPartitionError
import pytest


def test_json_producer_and_consumer_example(sluice):
    producer = KafkaProducer(
        bootstrap_servers=sluice.kafka,
        value_serializer=lambda v: json.dumps(v).encode("utf-8"),
    )
    sent = [{"id": i, "text": f"message {i}", "nested": {"even": i % 2 == 0}} for i in range(50)]
    for message in sent:
        producer.send("my-topic", message)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        "my-topic",
        bootstrap_servers=sluice.kafka,
        auto_offset_reset="earliest",
        group_id="my-group",
        value_deserializer=lambda m: json.loads(m.decode("utf-8")),
        consumer_timeout_ms=10_000,
    )
    received = []
    for record in consumer:
        received.append(record.value)
        if len(received) == len(sent):
            break
    consumer.commit()
    consumer.close()
    assert received == sent

    # The group's committed offsets survive a restart.
    sluice.restart()
    consumer = KafkaConsumer(
        "my-topic",
        bootstrap_servers=sluice.kafka,
        auto_offset_reset="earliest",
        group_id="my-group",
        consumer_timeout_ms=3_000,
    )
    assert list(consumer) == []
    consumer.close()


def test_admin_topics_partitions_and_configs(sluice):
    admin = KafkaAdminClient(bootstrap_servers=sluice.kafka)
    admin.create_topics([NewTopic("orders", num_partitions=3, replication_factor=1, topic_configs={"retention.ms": "60000"})])
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic("orders", num_partitions=3, replication_factor=1)])
    with pytest.raises(InvalidTopicError):
        admin.create_topics([NewTopic("bad name!", num_partitions=1, replication_factor=1)])
    described = admin.describe_topics(["orders"])
    assert len(described[0]["partitions"]) == 3

    admin.create_partitions({"orders": NewPartitions(total_count=5)})
    described = admin.describe_topics(["orders"])
    assert len(described[0]["partitions"]) == 5

    resource = ConfigResource(ConfigResourceType.TOPIC, "orders")
    if kafka.__version__.startswith("2."):
        # kafka-python 2.x returns the raw responses: (error, message, type, name, entries),
        # each entry starting with its name and value.
        [response] = admin.describe_configs([resource])
        [(error_code, _, _, name, entries)] = response.resources
        assert (error_code, name) == (0, "orders")
        values = {entry[0]: entry[1] for entry in entries}
        assert values["retention.ms"] == "60000"
        assert values["cleanup.policy"] == "delete"
    else:
        entries = admin.describe_configs([resource], config_filter="all")["topic"]["orders"]
        assert entries["retention.ms"]["value"] == "60000"
        assert entries["retention.ms"]["config_source"] == "DYNAMIC_TOPIC_CONFIG"
        assert entries["cleanup.policy"]["value"] == "delete"
        assert entries["cleanup.policy"]["config_source"] == "DEFAULT_CONFIG"

    admin.delete_topics(["orders"])
    assert "orders" not in admin.list_topics()
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.delete_topics(["orders"])
    admin.close()
