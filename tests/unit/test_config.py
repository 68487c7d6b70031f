import pytest

from kernel import names
from netdriver import options
from plugin import config
from wire.errors import ConfigError, InvalidOption


def test_defaults():
    s = config.load({"VXNET_HOST_ID": "h1"})
    assert (s.socket_path, s.embedded, s.scope, s.state_dir, s.host_id) == (
        "/run/docker/plugins/vxnet.sock", True, "local", "/var/lib/vxnet", "h1")
    # Without VXNET_HOST_ID the ID comes from the state dir (plugin/identity.py); the hostname is only the name.
    s = config.load({})
    assert s.host_id == "" and s.hostname and isinstance(s.hostname, str)


def test_values_are_read():
    s = config.load({"ETCD_ENDPOINTS": "http://10.0.0.1:2379, https://[::1]:2379", "VXNET_SCOPE": "GLOBAL",
                     "VXNET_ADVERTISE_ADDR": "192.0.2.4", "VXNET_LOG_LEVEL": "debug"})
    assert s.etcd_endpoints == ("http://10.0.0.1:2379", "https://[::1]:2379")
    assert (s.scope, s.advertise_addr, s.embedded) == ("global", "192.0.2.4", False)
    assert (s.encryption_secret_file, s.key_rotation_seconds) == (None, 43200)
    s = config.load({"VXNET_SCOPE": " Auto ", "VXNET_SWARM_STATE_DIR": "/host/docker-swarm"})
    assert (s.scope, s.swarm_state_dir) == ("auto", "/host/docker-swarm")
    assert config.load({}).swarm_state_dir == "/var/lib/docker/swarm"
    s = config.load({"VXNET_ENCRYPTION_SECRET_FILE": "/etc/vxnet/tls/encryption.key",
                     "VXNET_KEY_ROTATION_SECONDS": "0"})
    assert (s.encryption_secret_file, s.key_rotation_seconds) == ("/etc/vxnet/tls/encryption.key", 0)
    assert (config.load({}).stale_host_seconds, config.load({}).gc_seconds) == (3600, 300)
    s = config.load({"VXNET_STALE_HOST_SECONDS": "5", "VXNET_GC_SECONDS": "0"})
    assert (s.stale_host_seconds, s.gc_seconds) == (5, 0)
    assert config.load({}).reconcile_seconds == 30
    assert config.load({"VXNET_RECONCILE_SECONDS": "0"}).reconcile_seconds == 0


@pytest.mark.parametrize("env,needle", [
    ({"ETCD_ENDPOINTS": "10.0.0.1:2379"}, "ETCD_ENDPOINTS"),
    ({"VXNET_SCOPE": "swarm"}, "VXNET_SCOPE"),
    ({"VXNET_SWARM_STATE_DIR": "var/lib/docker/swarm"}, "VXNET_SWARM_STATE_DIR"),
    ({"VXNET_ADVERTISE_ADDR": "300.1.1.1"}, "VXNET_ADVERTISE_ADDR"),
    ({"VXNET_SOCKET": "relative.sock"}, "VXNET_SOCKET"),
    ({"VXNET_LOG_LEVEL": "loud"}, "VXNET_LOG_LEVEL"),
    ({"ETCD_CERT_FILE": "/c.pem"}, "ETCD_KEY_FILE"),
    ({"VXNET_EMBEDDED_ETCD_PORT": "70000"}, "VXNET_EMBEDDED_ETCD_PORT"),
    ({"VXNET_HOST_ID": "bad host"}, "VXNET_HOST_ID"),
    ({"VXNET_HOST_ID": "a/b"}, "VXNET_HOST_ID"),
    ({"VXNET_HOST_ID": "(none)"}, "VXNET_HOST_ID"),
    ({"VXNET_ENCRYPTION_SECRET_FILE": "secret.key"}, "VXNET_ENCRYPTION_SECRET_FILE"),
    ({"VXNET_KEY_ROTATION_SECONDS": "5"}, "VXNET_KEY_ROTATION_SECONDS"),
    ({"VXNET_KEY_ROTATION_SECONDS": "1h"}, "VXNET_KEY_ROTATION_SECONDS"),
    ({"VXNET_STALE_HOST_SECONDS": "0"}, "VXNET_STALE_HOST_SECONDS"),
    ({"VXNET_STALE_HOST_SECONDS": "1h"}, "VXNET_STALE_HOST_SECONDS"),
    ({"VXNET_GC_SECONDS": "-1"}, "VXNET_GC_SECONDS"),
    ({"VXNET_METRICS_ADDR": "9473"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_METRICS_ADDR": "localhost:9473"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_METRICS_ADDR": "::1:9473"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_METRICS_ADDR": "[127.0.0.1]:9473"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_METRICS_ADDR": "127.0.0.1:0"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_METRICS_ADDR": "127.0.0.1:65536"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_METRICS_ADDR": "127.0.0.1:"}, "VXNET_METRICS_ADDR"),
    ({"VXNET_RECONCILE_SECONDS": "-1"}, "VXNET_RECONCILE_SECONDS"),
    ({"VXNET_RECONCILE_SECONDS": "30s"}, "VXNET_RECONCILE_SECONDS"),
    ({"VXNET_RECONCILE_SECONDS": "100000"}, "VXNET_RECONCILE_SECONDS"),
])
def test_bad_settings_name_the_setting(env, needle):
    with pytest.raises(ConfigError, match=needle):
        config.load(env)


def test_metrics_address():
    assert config.load({}).metrics_addr == ("127.0.0.1", 9473)
    assert config.load({"VXNET_METRICS_ADDR": ""}).metrics_addr is None  # set and empty: off
    assert config.load({"VXNET_METRICS_ADDR": " 0.0.0.0:9100 "}).metrics_addr == ("0.0.0.0", 9100)
    assert config.load({"VXNET_METRICS_ADDR": "[::1]:9473"}).metrics_addr == ("::1", 9473)


def test_names_fit_ifnamsiz():
    eid = "f" * 64
    for name in (names.veth_container(eid), names.veth_bridge(eid), names.vxlan_staging(options.VNI_MAX)):
        assert len(name) <= 15 and name.startswith("vx")
    assert names.network_id_prefix(names.netns("a" * 64)) == "a" * 12
    assert names.network_id_prefix("docker-ns") == ""


def test_options_parse():
    o = options.parse({options.GENERIC: {"vni": "42", "mtu": "1400", "overlay": "blue"}, options.INTERNAL: True})
    assert (o.vni, o.mtu, o.overlay, o.internal) == (42, 1400, "blue", True)
    assert options.parse({options.GENERIC: {"encrypted": ""}}).encrypted
    with pytest.raises(InvalidOption, match="com.docker.network.internal"):
        options.parse({options.INTERNAL: "maybe"})
