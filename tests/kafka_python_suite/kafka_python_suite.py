"""pytest plugin: runs kafka-python's own integration suite (test/integration from its sdist)
against a Sluice broker started once per session, in the suite's external-broker mode.

Loaded with `-p kafka_python_suite` (see pytest.ini beside it) so that it sets the environment
before pytest imports the suite's conftest, which reads it at import time, and before skipif
marks are evaluated.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# The broker settings kafka-python's own fixture gives Kafka (its kafka.properties) and the
# suite depends on, as Sluice configuration.
SLUICE_ENV = {
    "SLUICE_KAFKA__AUTO_CREATE_TOPICS": "true",             # auto.create.topics.enable
    "SLUICE_KAFKA__NUM_PARTITIONS": "4",                    # num.partitions (4 in its conftest)
    "SLUICE_KAFKA__GROUP_MIN_SESSION_TIMEOUT_MS": "1000",   # group.min.session.timeout.ms
    "SLUICE_KAFKA__GROUP_INITIAL_REBALANCE_DELAY_MS": "0",  # group.initial.rebalance.delay.ms
    "SLUICE_LOG__LEVEL": "info",
}

# The Kafka release Sluice's ApiVersions answer looks like to kafka-python: 3.0.x passes it as
# api_version, and test_kafka_version_infer checks that the two agree.
KAFKA_VERSION = "4.1.0"

_LATER = {
    "acls": "ACLs: the security issue enables this",
    "txn": "transactions: the exactly-once issue enables this",
    "ssl": "SSL: the security issue enables this (the module also starts a broker of its own)",
}

# Tests of features that have an issue of their own, by node id suffix.
SKIP = {
    "test_admin_integration.py::test_create_describe_delete_acls": _LATER["acls"],
    "test_producer_integration.py::test_transactional_producer_messages": _LATER["txn"],
    "test_producer_integration.py::test_transactional_producer_offsets": _LATER["txn"],
    "test_ssl_integration.py::TestSSLConnection::test_ssl_handshake": _LATER["ssl"],
    "test_ssl_integration.py::TestSSLConnection::test_legacy_kafka_client_ssl": _LATER["ssl"],
    # The test assigns the new partitions to broker 0, the id its own Kafka fixture gives the
    # broker; a Sluice node's id is generated at its first start, so the assignment names a
    # broker that does not exist and is refused (INVALID_REPLICA_ASSIGNMENT), as Kafka would.
    "test_admin_integration.py::test_create_partitions": "hard-codes broker id 0",
    # Its wait for all four consumers compares the sets the wrong way round
    # (`set(consumers.keys()) - set(range(4))` is always empty), so on a slow machine it takes
    # the first consumer's lone assignment for the stable group and then finds that consumer
    # revoked by the later ones joining (failed so once in CI here, 2026-12-07). Four members
    # rebalancing are covered by tests/kafka's own group tests.
    "test_consumer_group.py::test_group": "racy in the suite: its all-consumers check is reversed",
}

# A race in kafka-python 3.0.x's client, not in the broker: when a consumer subscribes while its
# bootstrap Metadata request (sent before it had topics) is in flight, the answer to that request
# clears the client's "metadata needed" flag, and the client then waits metadata_max_age_ms
# (300 s by default) before asking for the topics it subscribed to. Under load this ended
# test_idempotent_producer_max_in_flight (30 s), test_kafka_consumer_max_bytes_simple (9 s) and
# test_kafka_consumer_unsupported_encoding (one 2 s poll; it failed about one run in four here
# with a 2 s age, never in 20 with 0.5 s). A short metadata age lets the client recover by itself
# within half a second; it changes how often the client asks, not what the broker answers.
# "3": only for the 3.x line.
CLIENT_DEFAULTS = {
    "3": {"metadata_max_age_ms": 500},
}

_broker = {}


def _sluice_binary():
    return os.environ.get("SLUICE_BIN") or str(Path(__file__).resolve().parents[2] / "target" / "debug" / "sluice")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    if "KAFKA_URI" in os.environ:  # a broker given from outside
        return
    work = Path(tempfile.mkdtemp(prefix="sluice-kafka-python-"))
    ready = work / "ready.json"
    with open(work / "sluice.log", "ab") as log:
        process = subprocess.Popen(
            [_sluice_binary(), "serve", "--data-dir", str(work / "data"),
             "--kafka-listen", "127.0.0.1:0", "--amqp-listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0", "--ready-file", str(ready)],
            stdout=log, stderr=log, env=dict(os.environ, **SLUICE_ENV))
    deadline = time.monotonic() + 30
    while not ready.exists() or not ready.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise pytest.UsageError(f"sluice did not start; see {work / 'sluice.log'}")
        time.sleep(0.02)
    kafka = json.loads(ready.read_text())["kafka"]
    _broker.update(process=process, work=work)
    os.environ["KAFKA_URI"] = f"PLAINTEXT://{kafka}"
    os.environ.setdefault("KAFKA_VERSION", KAFKA_VERSION)
    # The suite's fixture insists that KAFKA_ROOT is a directory, even for an external broker.
    os.environ.setdefault("KAFKA_ROOT", str(work))


def pytest_sessionfinish(session, exitstatus):
    session.config._sluice_failed = exitstatus not in (0, 5)


def pytest_unconfigure(config):
    process = _broker.get("process")
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # A failed session keeps the broker's data directory and log for a look.
    if getattr(config, "_sluice_failed", False) or process.returncode not in (0, -signal.SIGTERM):
        print(f"\nsluice log: {_broker['work'] / 'sluice.log'} (exit {process.returncode})")
    else:
        shutil.rmtree(_broker["work"], ignore_errors=True)


def pytest_configure(config):
    import kafka

    for key, value in CLIENT_DEFAULTS.get(kafka.__version__.split(".")[0], {}).items():
        kafka.KafkaConsumer.DEFAULT_CONFIG[key] = value


def pytest_collection_modifyitems(config, items):
    for item in items:
        for suffix, reason in SKIP.items():
            if item.nodeid.endswith(suffix):
                item.add_marker(pytest.mark.skip(reason=reason))
