"""Config: layering, env overrides, clear errors naming the key, documented reference."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pushsvc import config as config_module
from pushsvc.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_reference_file_is_in_sync() -> None:
    reference = (ROOT / "config" / "pushsvc.toml").read_text()
    assert reference == config_module.documented_defaults(), (
        "config/pushsvc.toml is stale: run `pushsvc check-config --reference > config/pushsvc.toml`"
    )
    # The reference parses and yields the defaults.
    loaded = config_module.load(str(ROOT / "config" / "pushsvc.toml"), environ={})
    assert loaded == config_module.Config()


def test_layering_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[ratelimit]\nrate = 7\n')
    environ = {
        "PUSHSVC_SERVER__PORT": "9100",
        "PUSHSVC_JWT_SECRET": "s",
        "PUSHSVC_SERVER__ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "PUSHSVC_CHAT__AUTO_JOIN": "false",
        "PUSHSVC_AUTH__ALGORITHMS": '["RS256"]',
    }
    config = config_module.load(str(path), environ, {"server": {"port": 9200}})
    assert config.server.port == 9200  # flag over env over file
    assert config.server.host == "0.0.0.0"  # file over default
    assert config.ratelimit.rate == 7.0  # ints accepted for floats
    assert config.auth.jwt_secret == "s"
    assert config.server.allowed_origins == ["https://a.example", "https://b.example"]
    assert config.chat.auto_join is False
    assert config.auth.algorithms == ["RS256"]
    assert config_module.load(str(path), {"PUSHSVC_CONFIG": "ignored"}).server.port == 9000
    env_path = {"PUSHSVC_CONFIG": str(path)}
    assert config_module.load(None, env_path).server.port == 9000


@pytest.mark.parametrize(
    ("text", "environ", "key"),
    [
        ("[ratelimit]\nrate = -1\n", {}, "ratelimit.rate"),
        ("[ratelimit]\nrate = 'fast'\n", {}, "ratelimit.rate"),
        ("[server]\nport = 1.5\n", {}, "server.port"),
        ("[server]\nxheaders = 1\n", {}, "server.xheaders"),
        ("[server]\nallowed_origins = 'x'\n", {}, "server.allowed_origins"),
        ("[server]\nbogus = 1\n", {}, "server.bogus"),
        ("[nope]\n", {}, "nope"),
        ("[log]\nformat = 'xml'\n", {}, "log.format"),
        ("[broker]\nurl = 'nats://localhost'\n", {}, "broker.url"),
        ("[store]\nurl = 'postgres://db'\n", {}, "store.url"),
        ("[cluster]\nurl = 'etcd://db'\n", {}, "cluster.url"),
        ("[cluster]\nnode_ttl = 0.1\n", {}, "cluster.node_ttl"),
        ("", {"PUSHSVC_RATELIMIT__BURST": "0"}, "ratelimit.burst"),
        ("", {"PUSHSVC_SERVER__NOPE": "1"}, "PUSHSVC_SERVER__NOPE"),
        ("[auth]\njwt_secret_file = '/nonexistent/secret'\n", {}, "auth.jwt_secret_file"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, text: str, environ: dict[str, str], key: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config_module.load(str(path), environ)
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)


def test_cluster_url_follows_a_redis_broker() -> None:
    assert config_module.build([]).cluster_url() == "memory://"
    on_redis = config_module.build([{"cluster": {"url": "redis://h:1/2"}}])
    assert on_redis.cluster_url() == "redis://h:1/2"
    # broker.url accepts only memory:// until the Redis broker lands; the rule is direct:
    broker = dataclasses.replace(on_redis.broker, url="redis://b:6379/0")
    shared = dataclasses.replace(on_redis, broker=broker, cluster=config_module.ClusterConfig())
    assert shared.cluster_url() == "redis://b:6379/0"


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_module.load(str(bad), {})
    with pytest.raises(ConfigError, match="cannot read"):
        config_module.load(str(tmp_path / "missing.toml"), {})


def test_secret_file_and_changed_keys(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    config = config_module.load(None, {"PUSHSVC_AUTH__JWT_SECRET_FILE": str(secret)})
    assert config.secret() == "from-file"
    old = config_module.Config()
    new = config_module.build([{"ratelimit": {"rate": 1.0}, "server": {"port": 1}}])
    assert config_module.changed_keys(old, new) == (["ratelimit.rate"], ["server.port"])


def test_effective_config_hides_secrets() -> None:
    text = config_module.to_toml(config_module.build([{"auth": {"jwt_secret": "hunter2"}}]))
    assert "hunter2" not in text and 'jwt_secret = "<set>"' in text


def test_plugin_tables_are_checked_against_the_schema(tmp_path: Path) -> None:
    from pushsvc.config import Setting

    schema = {
        "typing": {
            "rate": Setting(2.0, "Events per second.", minimum=0),
            "mode": Setting("room", "Who sees them.", choices=("room", "off")),
            "rooms": Setting(["a"], "Rooms."),
            "on": Setting(True, "Enabled."),
        }
    }
    path = tmp_path / "c.toml"
    path.write_text('[plugins]\ndisabled = ["x"]\n\n[plugins.typing]\nrate = 5\nmode = "off"\n')
    env = {"PUSHSVC_PLUGINS__TYPING__ON": "false", "PUSHSVC_PLUGINS__TYPING__ROOMS": "b, c"}
    config = config_module.load(str(path), environ=env).with_plugin_schemas(schema)
    assert config.plugins.disabled == ["x"]
    assert dict(config.plugin("typing")) == {
        "rate": 5.0,
        "mode": "off",
        "rooms": ["b", "c"],
        "on": False,
    }
    assert '[plugins.typing]\nrate = 5.0\nmode = "off"' in config_module.to_toml(config)
    # The environment wins over the file.
    env_rate = {"PUSHSVC_PLUGINS__TYPING__RATE": "7"}
    assert (
        config_module.load(str(path), environ=env_rate)
        .with_plugin_schemas(schema)
        .plugin("typing")["rate"]
        == 7.0
    )
    # Defaults, when there is no table.
    assert (
        config_module.load(environ={}).with_plugin_schemas(schema).plugin("typing")["rate"] == 2.0
    )
    with pytest.raises(KeyError):
        config.plugin("chat")

    cases = {
        "[plugins.typing]\nrate = -1\n": "plugins.typing.rate: must be at least 0",
        '[plugins.typing]\nrate = "fast"\n': "plugins.typing.rate: must be a number",
        '[plugins.typing]\nmode = "all"\n': "plugins.typing.mode: must be one of room, off",
        "[plugins.typing]\nspeed = 1\n": "plugins.typing.speed: unknown key (known: rate,",
        "[plugins.tpying]\nrate = 1\n": "plugins.tpying: no loaded plugin",
        "[plugins]\ntyping = 1\n": "plugins.typing: unknown key",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_module.load(str(path), environ={}).with_plugin_schemas(schema)
    with pytest.raises(ConfigError, match=r"plugins\.typing\.rate: must be at least 0"):
        config_module.load(environ={"PUSHSVC_PLUGINS__TYPING__RATE": "-3"}).with_plugin_schemas(
            schema
        )
    # A disabled plugin's table is ignored.
    path.write_text('[plugins]\ndisabled = ["gone"]\n\n[plugins.gone]\nx = 1\n')
    assert config_module.load(str(path), environ={}).with_plugin_schemas({}).plugin_values == {}
    # Plugin keys are restart-only.
    old = config_module.load(environ={}).with_plugin_schemas(schema)
    assert config_module.changed_keys(old, config) == (
        [],
        [
            "plugins.disabled",
            "plugins.typing.mode",
            "plugins.typing.on",
            "plugins.typing.rate",
            "plugins.typing.rooms",
        ],
    )


def test_setting_types() -> None:
    from pushsvc.config import Setting

    assert Setting(1, "n").kind is int and Setting([], "l").kind == list[str]
    assert Setting(1, "x", kind=float).kind is float
    with pytest.raises(TypeError):
        Setting({}, "no dict settings")
    with pytest.raises(TypeError):
        Setting(None, "n", kind=dict)
