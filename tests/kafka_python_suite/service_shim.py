"""Stand-in for kafka-python's test/service.py, which its sdist does not ship.

Only external-broker mode is used against Sluice, so SpawnedService is never started."""
import logging

log = logging.getLogger(__name__)


class ExternalService:
    def __init__(self, host, port):
        log.info("Using already running service at %s:%d", host, port)
        self.host = host
        self.port = port

    def open(self):
        pass

    def close(self):
        pass

    def dump_logs(self):
        pass


class SpawnedService:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("spawning a Kafka broker is not supported here; set KAFKA_URI")
