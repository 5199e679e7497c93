"""amqp-tools (librabbitmq's command-line clients) against the broker: declare, publish,
consume."""

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("amqp-publish") is None, reason="amqp-tools is not installed"
)


def run(*args, check=True):
    return subprocess.run(args, capture_output=True, timeout=30, check=check)


def test_amqp_tools_publish_and_consume(sluice):
    url = f"amqp://guest:guest@{sluice.amqp}"
    declared = run("amqp-declare-queue", "--url", url, "--queue", "tools", "--durable")
    assert declared.stdout.decode().strip() == "tools"
    for body in ("first", "second", "third"):
        run("amqp-publish", "--url", url, "--routing-key", "tools", "--body", body, "--persistent")
    consumed = run("amqp-consume", "--url", url, "--queue", "tools", "--count", "3", "cat")
    assert consumed.stdout.decode() == "firstsecondthird"
    # amqp-consume acknowledged them: nothing is left.
    again = run("amqp-get", "--url", url, "--queue", "tools", check=False) if shutil.which("amqp-get") else None
    if again is not None:
        assert again.returncode != 0
