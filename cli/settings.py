"""`vxnet settings`: the vxnet plugins installed on this host's Docker engine (DOCKER_HOST, else /run/docker.sock),
enabled or not, each with its settings checked exactly as the plugin checks them when it starts (plugin/config.py
load): the setting that stops it, named with the reason, and the `docker plugin set` that fixes it.

Why a command: dockerd 20.10 shows no text of a plugin's in `docker plugin enable`'s error, only that its socket
never answered (docs/install.md); the plugin's own line is in dockerd's log, and this says it where the operator is.

Exit status: 0 every vxnet plugin's settings are valid, 1 one is not (or none is installed), 2 the engine does not
answer. --json: {"engine", "plugins": [{"name", "id", "enabled", "version", "ok", "setting", "error", "fix"}]}.
"""

import argparse
import re
from typing import List, Optional

import docker
import docker.errors
import requests

from cli import context
from plugin import config
from wire.errors import ConfigError, VxnetError

# config.json's Description starts so (the one mark every build of the plugin carries, whatever its name).
_DESCRIPTION = "vxnet:"
# ConfigError messages start with the setting they are about (tests/unit/test_config.py holds every one to it).
_SETTING = re.compile(r"([A-Z][A-Z0-9_]*(?:/[A-Z][A-Z0-9_]*)*): ")


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("settings", parents=[common], help="the vxnet plugins here, their settings checked",
                                   description=__doc__.split("\n\n")[0])
    parser.set_defaults(func=run)


def check(plugin: dict) -> dict:
    """One plugin as the engine's /plugins lists it -> {"name", "id", "enabled", "version", "ok", "setting",
    "error", "fix"} (setting, error, fix: None when ok)."""
    name = plugin.get("Name") or "?"
    env = {}
    for item in (plugin.get("Settings") or {}).get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    out = {"name": name, "id": str(plugin.get("Id") or "")[:12], "enabled": bool(plugin.get("Enabled")),
           "version": _tag(plugin.get("PluginReference") or name), "ok": True, "setting": None, "error": None,
           "fix": None}
    try:
        config.load(env)
    except ConfigError as exc:
        found = _SETTING.match(str(exc))
        setting = found.group(1) if found else None
        first = setting.split("/")[0] if setting else "SETTING"
        out.update(ok=False, setting=setting, error=str(exc),
                   fix=(("docker plugin disable " + name + " && ") if out["enabled"] else "")
                   + f"docker plugin set {name} {first}=<value> && docker plugin enable {name}")
    return out


def _tag(reference: str) -> Optional[str]:
    last = reference.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def vxnet_plugins(plugins: List[dict]) -> List[dict]:
    return [p for p in plugins if str((p.get("Config") or {}).get("Description") or "").startswith(_DESCRIPTION)]


def _render(data: dict) -> str:
    if not data["plugins"]:
        return f"no vxnet plugin is installed on {data['engine']}"
    lines = []
    for p in data["plugins"]:
        state = "enabled" if p["enabled"] else "disabled"
        if p["ok"]:
            lines.append(f"{p['name']} ({state}, id {p['id']}): settings valid")
        else:
            lines.append(f"{p['name']} ({state}, id {p['id']}): {p['error']}")
            lines.append(f"  fix: {p['fix']}")
    return "\n".join(lines)


def run(ctx: context.Context, args) -> int:
    engine = ctx.settings.engine
    try:
        client = docker.APIClient(base_url=engine, version="auto", timeout=10)
        listed = client.plugins()
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        raise VxnetError(f"the Docker engine at {engine} does not answer: {exc}") from None
    found = [check(p) for p in vxnet_plugins(listed)]
    ctx.emit({"engine": engine, "plugins": found}, _render)
    return context.OK if found and all(p["ok"] for p in found) else context.PROBLEM
