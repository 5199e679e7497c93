"""The `sluice` command line against a live broker: tables, JSON, and errors."""

import json
import os
import subprocess

from conftest import run_cli as cli, sluice_binary


def test_topics_produce_and_consume_in_tables_and_json(sluice):
    out = cli(sluice, "topic", "create", "orders", "--partitions", "3", "--config", "retention.ms=60000").stdout
    assert out.strip() == "created topic orders with 3 partitions"

    listing = cli(sluice, "topic", "list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "PARTITIONS", "RECORDS", "SIZE", "BYTES"]
    assert listing[1].split()[:3] == ["orders", "3", "0"]

    produced = cli(sluice, "produce", "orders", "--key-separator", ":", "--partition", "1",
                   "--header", "source=cli", input="k1:first\nk2:second\nthird\n").stdout
    assert produced.strip() == "published 3 messages to orders"

    as_json = json.loads(cli(sluice, "topic", "list", "--output", "json").stdout)
    assert [(t["name"], t["partitions"], t["records"]) for t in as_json] == [("orders", 3, 3)]

    described = cli(sluice, "topic", "describe", "orders").stdout
    assert "topic orders" in described
    assert "retention.ms" in described and "60000" in described and "topic" in described

    table = cli(sluice, "consume", "orders", "--partition", "1", "--from-beginning", "--count", "3").stdout.splitlines()
    assert table[0].split() == ["PARTITION", "OFFSET", "KEY", "VALUE"]
    assert [line.split() for line in table[1:]] == [["1", "0", "k1", "first"], ["1", "1", "k2", "second"], ["1", "2", "-", "third"]]

    lines = cli(sluice, "consume", "orders", "--from-beginning", "--count", "2", "--output", "json").stdout.splitlines()
    messages = [json.loads(line) for line in lines]
    assert [(m["offset"], m["key"], m["value"], m["headers"]) for m in messages] == [
        (0, "k1", "first", {"source": "cli"}), (1, "k2", "second", {"source": "cli"})]

    altered = cli(sluice, "topic", "alter", "orders", "--set", "segment.ms=3600000", "--partitions", "4", "--output", "json").stdout
    detail = json.loads(altered)
    assert len(detail["partitions"]) == 4
    assert {c["name"]: c["value"] for c in detail["config"]}["segment.ms"] == "3600000"

    status = json.loads(cli(sluice, "status", "--output", "json").stdout)
    assert status["totals"]["topics"] == 1
    assert status["totals"]["records"] == 3

    assert cli(sluice, "topic", "delete", "orders").stdout.strip() == "deleted topic orders"


def test_errors_are_clear_with_non_zero_exit(sluice):
    missing = cli(sluice, "topic", "describe", "nope", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'error: topic "nope" does not exist'

    invalid = cli(sluice, "topic", "create", "bad name!", check=False)
    assert invalid.returncode == 1
    assert "invalid topic name" in invalid.stderr and "' ' is not allowed" in invalid.stderr

    wrong_password = subprocess.run([str(sluice_binary()), "status"], capture_output=True, text=True,
                                    env=dict(os.environ, SLUICE_URL=sluice.http, SLUICE_USER="guest", SLUICE_PASSWORD="nope"))
    assert wrong_password.returncode == 1
    assert "wrong" in wrong_password.stderr

    unreachable = subprocess.run([str(sluice_binary()), "status"], capture_output=True, text=True,
                                 env=dict(os.environ, SLUICE_URL="http://127.0.0.1:1"))
    assert unreachable.returncode == 3
    assert "cannot reach the broker" in unreachable.stderr

    usage = cli(sluice, "group", "reset-offsets", "g", check=False)
    assert usage.returncode == 2


def test_groups_list_describe_and_reset(sluice):
    from confluent_kafka import Consumer, Producer, TopicPartition
    producer = Producer({"bootstrap.servers": sluice.kafka})
    for i in range(10):
        producer.produce("clicks", value=str(i), partition=0)
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "reporting", "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition("clicks", 0, 4)], asynchronous=False)
    consumer.close()

    listing = cli(sluice, "group", "list").stdout.splitlines()
    assert listing[0].split() == ["GROUP", "STATE", "MEMBERS", "LAG"]
    assert listing[1].split() == ["reporting", "Empty", "0", "6"]

    detail = json.loads(cli(sluice, "group", "describe", "reporting", "--output", "json").stdout)
    assert [(o["topic"], o["partition"], o["committed"], o["lag"]) for o in detail["offsets"]] == [("clicks", 0, 4, 6)]

    dry = cli(sluice, "group", "reset-offsets", "reporting", "--to-earliest", "--dry-run").stdout
    assert "(dry run: nothing was committed)" in dry
    assert json.loads(cli(sluice, "group", "describe", "reporting", "--output", "json").stdout)["offsets"][0]["committed"] == 4

    reset = json.loads(cli(sluice, "group", "reset-offsets", "reporting", "--to-offset", "8", "--output", "json").stdout)
    assert [(r["previous"], r["new"]) for r in reset] == [(4, 8)]
    assert json.loads(cli(sluice, "group", "describe", "reporting", "--output", "json").stdout)["lag"] == 2
