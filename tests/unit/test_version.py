"""wire/version.py: one version, pyproject's, read from the rootfs's VERSION file or the tree; parsed strictly."""

import pytest

from wire import version


@pytest.mark.parametrize("text, parsed", [
    ("0.1.0", (0, 1, 0, "")),
    ("12.0.7", (12, 0, 7, "")),
    ("1.2.3-rc.1", (1, 2, 3, "rc.1")),
])
def test_versions_parse(text, parsed):
    assert version.parse(text) == parsed
    assert str(version.parse(text)) == text


@pytest.mark.parametrize("text", ["", "1", "1.2", "01.2.3", "1.2.3+build5", "v1.2.3", "1.2.3-", "1.2.3 ", None,
                                  "1.2.3-" + "a" * 130])
def test_bad_versions_are_refused_saying_the_rule(text):
    with pytest.raises(ValueError, match="MAJOR.MINOR.PATCH"):
        version.parse(text)


def test_only_the_project_tables_version_is_declared():
    text = '[tool.other]\nversion = "9.9.9"\n[project]\nname = "vxnet"\nversion = "0.3.1"\n[x]\nversion = "1.0.0"\n'
    assert version.declared(text) == "0.3.1"
    assert version.declared('[tool.x]\nversion = "1.0.0"\n') is None


def test_the_tree_reads_pyproject_and_a_rootfs_reads_its_version_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "vxnet"\nversion = "0.4.0"\n')
    assert version.read(str(tmp_path)) == "0.4.0"
    # The build writes VERSION beside the packages: it wins (a second build of the same tree, another number).
    (tmp_path / version.VERSION_FILE).write_text("0.5.0\n")
    assert version.read(str(tmp_path)) == "0.5.0"
    # A VERSION file that is no version is not believed.
    (tmp_path / version.VERSION_FILE).write_text("garbage\n")
    assert version.read(str(tmp_path)) == "0.4.0"


def test_neither_file_reads_as_unknown(tmp_path):
    assert version.read(str(tmp_path)) == version.UNKNOWN
    assert version.parse(version.UNKNOWN)


def test_this_trees_version_is_pyprojects():
    import pathlib
    root = pathlib.Path(version.__file__).resolve().parents[1]
    assert version.current() == version.declared((root / "pyproject.toml").read_text())


def test_the_build_scripts_entry_point_checks_a_version(capsys):
    assert version.main(["0.2.0"]) == 0
    assert capsys.readouterr().out == "0.2.0\n"
    assert version.main(["0.2"]) == 2
    assert "VERSION: '0.2' is not a version" in capsys.readouterr().err
    assert version.main([]) == 0
    assert capsys.readouterr().out.strip() == version.current()


def test_the_plugin_answers_its_version_on_its_socket_beside_the_protocol():
    from plugin.http import VERSION_PATH, make_app
    from plugin.routes import IPAM, NETWORK
    from store import schema

    client = make_app({NETWORK: object(), IPAM: object()}).test_client()
    reply = client.get(VERSION_PATH)
    assert reply.status_code == 200
    assert reply.get_json(force=True) == {"Version": version.current(),
                                          "Schema": f"{schema.SCHEMA_MAJOR}.{schema.SCHEMA_MINOR}"}
    # The protocol's calls are untouched: Activate still lists the drivers.
    assert client.post("/Plugin.Activate").get_json(force=True) == {"Implements": [NETWORK, IPAM]}
