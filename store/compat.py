"""The schema record: which layout of the tree a store holds, so that plugins of different versions share it.

One key, schema.SCHEMA_RECORD: {"major": M, "minor": m, "written_by": "<vxnet version>"}. At start-up every plugin
calls check() before it reads or writes anything else:

  no record           a store from before the record (schema 1.0) or an empty one: write ours (create-if-absent:
                      of plugins starting at once, one writes, the others read it)
  major > ours        SchemaTooNew: written by a newer vxnet whose layout this one cannot read; the plugin stops
  major < ours        SchemaTooNew as well: a store that needs a migration this version does not do
  minor < ours        ours is written over it (compare-and-put on its revision): additions an older plugin
                      of the same major ignores, so both keep serving during a rolling upgrade
  minor >= ours       read as is: additions of a newer minor are ignored here
"""

import json
import logging
from typing import NamedTuple

from store import schema
from store.kv import KV
from wire.errors import SchemaTooNew, StoreUnavailable

log = logging.getLogger(__name__)

_RETRIES = 8  # compare-and-put rounds lost to another plugin starting at the same moment


class Layout(NamedTuple):
    major: int
    minor: int
    written_by: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


OURS = Layout(schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR)


def _parse(key: str, text: str) -> Layout:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if (not isinstance(value, dict) or not all(isinstance(value.get(f), int) and not isinstance(value.get(f), bool)
                                               and value.get(f) >= 0 for f in ("major", "minor"))):
        raise SchemaTooNew(f"etcd key {key} holds {text[:200]!r}, not a schema record "
                           '{"major": N, "minor": N}: a tree this vxnet does not know; delete the key only if '
                           "nothing but vxnet writes under it")
    by = value.get("written_by")
    return Layout(value["major"], value["minor"], by if isinstance(by, str) else "")


def check(kv: KV, software: str, prefix: str = schema.PREFIX, ours: Layout = OURS) -> Layout:
    """Make sure this plugin (version software, schema ours) may use the store under prefix; returns the layout
    the store holds afterwards. Raises SchemaTooNew (see the module's docstring), StoreUnavailable while etcd
    does not answer."""
    key = schema.Schema(prefix).schema_record()
    mine = json.dumps({"major": ours.major, "minor": ours.minor, "written_by": software}, sort_keys=True)
    for _ in range(_RETRIES):
        entry = kv.get(key)
        if entry is None:
            if kv.commit(absent=[key], puts={key: mine}):
                log.info("schema %s written to %s (a new store, or one from before schema records)", ours, key)
                return Layout(ours.major, ours.minor, software)
            continue
        found = _parse(key, entry.value)
        if found.major != ours.major:
            newer = found.major > ours.major
            raise SchemaTooNew(
                f"the etcd store under {prefix} is schema {found} (written by vxnet {found.written_by or '?'}); "
                f"this plugin, vxnet {software}, reads schema {ours.major}.x only: "
                + ("upgrade this plugin to a vxnet of schema major " + str(found.major) if newer else
                   "it needs a migration this version does not do; use the vxnet that wrote it"))
        if found.minor >= ours.minor:
            if found.minor > ours.minor:
                log.info("store schema %s (written by vxnet %s) is newer than this plugin's %s: what it adds is "
                         "ignored here", found, found.written_by or "?", ours)
            return found
        if kv.commit(revisions={key: entry.mod_revision}, puts={key: mine}):
            log.info("store schema raised from %s to %s", found, ours)
            return Layout(ours.major, ours.minor, software)
    # Other plugins writing the record every round: retried by the caller, as an etcd that does not answer.
    raise StoreUnavailable(f"{key} changed {_RETRIES} times while this plugin read it")
