"""Settings as `docker plugin install ... KEY=VALUE` gives them: every settable one of config.json is checked at
start with an error that starts with its name (what `vxnet settings` and dockerd's log show); the plugin refuses
with exit status 2 before opening any socket; `vxnet settings` names the setting and the fix."""

import json
import pathlib

import pytest

from cli import settings as cli_settings
from plugin import config
from plugin import main as plugin_main
from wire.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = json.loads((ROOT / "config.json").read_text())

# One bad value per settable setting; the ones any string fits are named with the reason.
BAD = {
    "VXNET_SCOPE": "swarmish",
    "ETCD_ENDPOINTS": "etcd1:2379",
    "ETCD_CERT_FILE": "/etc/vxnet/tls/cert.pem",  # without ETCD_KEY_FILE
    "ETCD_KEY_FILE": "/etc/vxnet/tls/key.pem",  # without ETCD_CERT_FILE
    "VXNET_ENCRYPTION_SECRET_FILE": "relative/key",
    "VXNET_KEY_ROTATION_SECONDS": "30",
    "VXNET_STALE_HOST_SECONDS": "0",
    "VXNET_GC_SECONDS": "5m",
    "VXNET_METRICS_ADDR": "localhost:9473",
    "VXNET_RECONCILE_SECONDS": "-1",
    "VXNET_MAX_ENDPOINTS": "lots",
    "VXNET_DOCKER_HOST": "/run/docker.sock",
    "VXNET_ADVERTISE_ADDR": "host1",
    "VXNET_HOST_ID": "@swarm",
    "VXNET_LOG_LEVEL": "chatty",
    "VXNET_EMBEDDED_ETCD_PORT": "65535",
    "VXNET_STATE_DIR": "var/lib/vxnet",
    "VXNET_NETNS_DIR": "run/netns",
}
ANY_STRING = {"ETCD_CA_FILE": "a path; a missing file is etcd's TLS error when the plugin connects"}


def settable():
    return [e["Name"] for e in CONFIG["Env"] if e.get("Settable")]


def test_every_settable_setting_has_a_bad_value_here_or_takes_any_string():
    assert sorted(settable()) == sorted(set(BAD) | set(ANY_STRING))


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_by_a_message_that_starts_with_the_settings_name(name):
    with pytest.raises(ConfigError) as exc:
        config.load({name: BAD[name]})
    message = str(exc.value)
    assert cli_settings._SETTING.match(message), message
    assert name in cli_settings._SETTING.match(message).group(1).split("/")


def test_the_plugin_refuses_before_any_socket_with_status_2(capsys, tmp_path):
    sock = tmp_path / "vxnet.sock"
    assert plugin_main.main({"VXNET_MAX_ENDPOINTS": "lots", "VXNET_SOCKET": str(sock)}) == 2
    assert capsys.readouterr().err.startswith("vxnet: VXNET_MAX_ENDPOINTS: 'lots' must be a whole number")
    assert not sock.exists()


def plugin(env, enabled=False, name="192.168.251.1:5000/vxnet:0.1.0", reference=None):
    return {"Name": name, "Id": "f" * 64, "Enabled": enabled, "PluginReference": reference or name,
            "Config": {"Description": CONFIG["Description"]}, "Settings": {"Env": env}}


def test_vxnet_settings_names_the_setting_and_the_fix():
    found = cli_settings.check(plugin(["VXNET_SCOPE=local", "VXNET_MAX_ENDPOINTS=lots"]))
    assert found["ok"] is False and found["setting"] == "VXNET_MAX_ENDPOINTS" and found["enabled"] is False
    assert found["error"].startswith("VXNET_MAX_ENDPOINTS: 'lots' must be")
    assert found["fix"] == ("docker plugin set 192.168.251.1:5000/vxnet:0.1.0 VXNET_MAX_ENDPOINTS=<value> && "
                            "docker plugin enable 192.168.251.1:5000/vxnet:0.1.0")
    # Upgraded: the name stays, the version is the reference's.
    ok = cli_settings.check(plugin(["VXNET_SCOPE=local"], enabled=True,
                                   reference="192.168.251.1:5000/vxnet:0.1.1"))
    assert ok == {"name": "192.168.251.1:5000/vxnet:0.1.0", "id": "f" * 12, "enabled": True, "version": "0.1.1",
                  "ok": True, "setting": None, "error": None, "fix": None}


def test_only_vxnet_plugins_are_listed():
    other = {"Name": "weave:latest", "Config": {"Description": "Weave Net plugin"}, "Settings": {"Env": []}}
    mine = plugin([])
    assert cli_settings.vxnet_plugins([other, mine]) == [mine]
