"""kcat: metadata listing, produce and consume with keys and headers."""

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by scripts/test")


def kcat(*args, input=None, timeout=30):
    result = subprocess.run(["kcat", *args], input=input, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def node_id(sluice):
    """The broker's id: the node id it made at its first start."""
    import json
    import urllib.request

    request = urllib.request.Request(sluice.http + "/api/cluster")
    request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["node_id"]


def test_metadata_produce_and_consume_with_keys_and_headers(sluice):
    # Produce three keyed records with headers; the topic is created on first use.
    kcat("-b", sluice.kafka, "-t", "kc", "-P", "-K", ":", "-H", "trace=abc", "-H", "source=kcat",
         input="k1:first\nk2:second\nk1:third\n")
    listing = kcat("-b", sluice.kafka, "-L")
    assert "1 brokers:" in listing
    me = node_id(sluice)
    assert f"broker {me} at {sluice.kafka}" in listing
    assert 'topic "kc" with 1 partitions' in listing
    assert f"partition 0, leader {me}, replicas: {me}, isrs: {me}" in listing

    out = kcat("-b", sluice.kafka, "-t", "kc", "-C", "-e", "-f", "%k|%s|%o|%h\n")
    assert out.splitlines() == [
        "k1|first|0|trace=abc,source=kcat",
        "k2|second|1|trace=abc,source=kcat",
        "k1|third|2|trace=abc,source=kcat",
    ]
    # Offsets: the query API and a consume from an explicit offset.
    assert kcat("-b", sluice.kafka, "-t", "kc", "-C", "-e", "-o", "2", "-f", "%s\n").splitlines() == ["third"]
    assert "kc [0] offset 0" in kcat("-b", sluice.kafka, "-Q", "-t", "kc:0:0")


def test_json_metadata_and_unknown_topic(sluice):
    import json
    kcat("-b", sluice.kafka, "-t", "a", "-P", input="x\n")
    data = json.loads(kcat("-b", sluice.kafka, "-L", "-J"))
    assert [t["topic"] for t in data["topics"]] == ["a"]
    assert data["brokers"][0]["id"] == node_id(sluice)
