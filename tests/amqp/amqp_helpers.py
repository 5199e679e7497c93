"""Helpers shared by the AMQP 0-9-1 client tests."""

import time

from conftest import amqp_parameters as parameters  # noqa: F401 (re-exported for the tests)


def drain(channel, queue, expected, timeout=10.0):
    """Gets messages from `queue` with basic.get until `expected` arrived (or time runs out)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        got.append((method, properties, body))
    return got


def bodies(messages):
    return [body for _, _, body in messages]


def wait_for(predicate, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Collector:
    """Collects deliveries of one consumer on a blocking connection, without acknowledging."""

    def __init__(self, connection, queue, prefetch=None, auto_ack=False, **consume_args):
        self.connection = connection
        self.channel = connection.channel()
        if prefetch is not None:
            self.channel.basic_qos(prefetch_count=prefetch)
        self.deliveries = []
        self.tag = self.channel.basic_consume(
            queue, self._on_message, auto_ack=auto_ack, **consume_args
        )

    def _on_message(self, channel, method, properties, body):
        self.deliveries.append((method, properties, body))

    def pump(self, seconds=0.1):
        self.connection.process_data_events(time_limit=seconds)

    def wait(self, count, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count and time.monotonic() < deadline:
            self.pump(0.05)
        return len(self.deliveries) >= count

    def ack(self, method, multiple=False):
        self.channel.basic_ack(method.delivery_tag, multiple=multiple)

    @property
    def bodies(self):
        return [body for _, _, body in self.deliveries]
