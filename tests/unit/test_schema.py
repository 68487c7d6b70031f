"""The etcd schema: the tree in store/schema.py's docstring, its templates and the README's key list are one and
the same; every builder makes a key of its template; no key part can reach into another part of the tree."""

import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store import schema
from wire.errors import InvalidRequest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("plugin", "netdriver", "ipam_driver", "encrypt", "kernel", "store", "wire")


def _docstring_tree():
    """The first word of each entry of the docstring's tree (entries are indented two spaces, their
    continuation lines further)."""
    text = schema.__doc__
    tree = text[text.index("The tree"):text.index("The parts")]
    return [m.group(1) for m in re.finditer(r"^  (\S+)", tree, re.MULTILINE)]


def _docstring_parts():
    text = schema.__doc__
    parts = text[text.index("The parts"):]
    return [m.group(1) for m in re.finditer(r"^  <([a-z]+)>", parts, re.MULTILINE)]


def _readme_keys():
    """The code spans of the README's "Keys, under ..." paragraph (section "Looking inside")."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Looking inside"):]
    paragraph = section[section.index("\nKeys"):].split("\n\n")[0]
    return re.findall(r"`([^`]+)`", paragraph)


def test_the_docstring_draws_exactly_the_templates():
    assert _docstring_tree() == list(schema.TEMPLATES)


def test_every_placeholder_of_the_templates_is_explained_once():
    used = {name for template in schema.TEMPLATES for name in re.findall(r"<([a-z]+)>", template)}
    explained = _docstring_parts()
    assert sorted(explained) == sorted(set(explained)) and set(explained) == used


def test_the_readme_lists_the_prefix_and_every_template_in_order():
    spans = _readme_keys()
    keys = [s for s in spans if s in schema.TEMPLATES or "<" in s or s.startswith("/")]
    assert keys[0] == schema.PREFIX + "/"
    assert keys[1:] == list(schema.TEMPLATES)


def test_the_prefix_is_written_nowhere_else_in_the_code():
    hits = [str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            if schema.PREFIX in path.read_text()]
    assert hits == ["store/schema.py"]


SAMPLES = {"network": "a" * 64, "endpoint": "b" * 64, "segment": "overlay-blue", "vni": "4096",
           "host": "h1", "space": "vxnet-local", "pool": "10.1.0.0_24", "address": "10.1.0.5",
           "rule": "0123456789ab", "service": "0123456789abcdefghijklmno"}
BUILDERS = {
    schema.NETWORK: lambda k: k.network("a" * 64),
    schema.SEGMENT: lambda k: k.segment("overlay-blue"),
    schema.VNI: lambda k: k.vni(4096),
    schema.MEMBER: lambda k: k.member("overlay-blue", "h1"),
    schema.ENDPOINT: lambda k: k.endpoint("a" * 64, "b" * 64),
    schema.POLICY: lambda k: k.policy_rule("overlay-blue", "0123456789ab"),
    schema.PEER: lambda k: k.peer("overlay-blue", "b" * 64),
    schema.SERVICE: lambda k: k.service("0123456789abcdefghijklmno"),
    schema.HOST: lambda k: k.host("h1"),
    schema.DEPARTED: lambda k: k.departed("h1"),
    schema.HEALTH: lambda k: k.health("10.1.0.5"),
    schema.POOL: lambda k: k.pool("vxnet-local", "10.1.0.0/24"),
    schema.ADDRESS: lambda k: k.address("vxnet-local", "10.1.0.0/24", "10.1.0.5"),
    schema.KEYRING: lambda k: k.keyring(),
    schema.SCHEMA_RECORD: lambda k: k.schema_record(),
}


@pytest.mark.parametrize("template", schema.TEMPLATES)
def test_each_builder_makes_a_key_of_its_template_under_the_prefix(template):
    keys = schema.Schema("/elsewhere/")
    key = BUILDERS[template](keys)
    parts = keys.parse(template, key)
    assert key.startswith("/elsewhere/") and parts is not None
    assert parts == {name: SAMPLES[name] for name in re.findall(r"<([a-z]+)>", template)}
    assert schema.Schema().key(template, **parts) == schema.PREFIX + "/" + key[len("/elsewhere/"):]


def test_prefixes_stop_at_the_first_part_not_given_and_select_their_keys():
    keys = schema.Schema()
    assert keys.prefix(schema.PEER) == "/vxnet/v1/peers/"
    assert keys.prefix(schema.MEMBER, segment="s") == "/vxnet/v1/members/s/"
    assert keys.addresses("vxnet-local", "10.1.0.0/24") == "/vxnet/v1/ipam/addresses/vxnet-local/10.1.0.0_24/"
    assert keys.address("vxnet-local", "10.1.0.0/24", "10.1.0.5").startswith(keys.addresses("vxnet-local",
                                                                                            "10.1.0.0/24"))
    with pytest.raises(TypeError):
        keys.key(schema.MEMBER, segment="s")  # a key needs every part
    with pytest.raises(TypeError):
        keys.key(schema.HOST, host="h1", vni="1")  # and no part its template lacks


def test_parse_refuses_keys_of_another_shape():
    keys = schema.Schema()
    assert keys.peer_of(keys.peer("s", "e")) == ("s", "e")
    assert keys.peer_of("/vxnet/v1/peers/s") is None
    assert keys.peer_of("/vxnet/v1/peers/s/e/x") is None
    assert keys.peer_of("/other/peers/s/e") is None
    assert keys.parse(schema.PEER, keys.endpoint("n", "e")) is None
    assert keys.service_of(keys.service("s1")) == "s1"
    assert keys.service_of(keys.peer("s", "e")) is None


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../../etc/passwd", "0.0.0.0/0", "a\0b", "a b", None, 7])
def test_a_part_that_is_not_a_plain_name_is_refused_naming_it(bad):
    with pytest.raises(InvalidRequest, match="cannot be a key part"):
        schema.Schema().endpoint("n", bad)


@given(st.text(min_size=1, max_size=20))
def test_whatever_a_part_is_the_key_is_refused_or_has_the_shape_of_its_template(text):
    keys = schema.Schema()
    try:
        key = keys.peer("seg", text)
    except InvalidRequest:
        assert "/" in text or text in (".", "..") or not re.fullmatch(r"[A-Za-z0-9@_.:-]+", text)
        return
    assert keys.peer_of(key) == ("seg", text)
