"""The plugin's /metrics as a test reads it: fetched from inside a simulated host (each has its own loopback, where
the plugin listens by default), parsed with prometheus-client's own parser."""

import sys
from typing import Dict, Tuple

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.hosts import Host

DEFAULT_ADDR = "127.0.0.1:9473"  # plugin/config.py Settings.metrics_addr

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]

_FETCH = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def fetch(host: Host, addr: str = DEFAULT_ADDR) -> str:
    """The text of http://addr/metrics, fetched inside the host's namespaces."""
    return host.run([sys.executable, "-c", _FETCH, f"http://{addr}/metrics"], timeout=30).stdout


def parse(text: str) -> Samples:
    """Every sample: (sample name, sorted labels) -> value. Raises if the text is not Prometheus text."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(host: Host, addr: str = DEFAULT_ADDR) -> Samples:
    return parse(fetch(host, addr))


def get(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when it is not there (a counter that has not moved yet has no sample)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
