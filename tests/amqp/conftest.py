"""Fixtures of the AMQP 0-9-1 client tests: pika connections to the `sluice` fixture's broker."""

import pika
import pytest

from amqp_helpers import parameters


@pytest.fixture
def connect(sluice):
    """Opens pika connections to the broker and closes them when the test ends."""
    opened = []

    def make(broker=None, **kwargs):
        connection = pika.BlockingConnection(parameters(broker or sluice, **kwargs))
        opened.append(connection)
        return connection

    yield make
    for connection in opened:
        if connection.is_open:
            try:
                connection.close()
            except Exception:
                pass
