"""`vxnet version`: this command's version, and that of each vxnet plugin answering on this host (asked on its
socket: VXNET_SOCKET, else a managed plugin's under /run/docker/plugins/<plugin id>/, as `vxnet doctor` finds it).

Exit status: 0 a plugin answered, 1 none did (the command's own version is printed regardless).
--json: {"command": "0.2.0", "plugins": [{"socket", "version", "schema"} | {"socket", "error"}]}.
"""

import argparse
import json
from typing import List

from cli import context
from cli.doctor import SOCKET_TIMEOUT, UnixConnection, plugin_sockets
from plugin.http import VERSION_PATH
from wire import version


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("version", parents=[common], help="this command's and the plugin's version",
                                   description=__doc__.split("\n\n")[0])
    parser.set_defaults(func=run)


def ask(path: str, timeout: float = SOCKET_TIMEOUT) -> dict:
    """{"socket", "version", "schema"} from the plugin on path, or {"socket", "error"}."""
    conn = UnixConnection(path, timeout)
    try:
        conn.request("GET", VERSION_PATH)
        reply = conn.getresponse()
        body = reply.read()
    except OSError as exc:
        return {"socket": path, "error": exc.strerror or str(exc)}
    finally:
        conn.close()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if reply.status != 200 or not isinstance(data, dict) or not isinstance(data.get("Version"), str):
        # A vxnet from before this call answers 404 ("unknown call").
        return {"socket": path, "error": f"HTTP {reply.status} {body[:100]!r} (a vxnet older than this call?)"}
    return {"socket": path, "version": data["Version"], "schema": str(data.get("Schema") or "?")}


def _render(data: dict) -> str:
    lines = [f"vxnet command  {data['command']}"]
    for p in data["plugins"]:
        if "error" in p:
            lines.append(f"plugin         ? ({p['socket']}: {p['error']})")
        else:
            lines.append(f"plugin         {p['version']} (etcd schema {p['schema']}; {p['socket']})")
    if not data["plugins"]:
        lines.append("plugin         none answers on this host")
    return "\n".join(lines)


def run(ctx: context.Context, args) -> int:
    plugins: List[dict] = [ask(path) for path in plugin_sockets(ctx.settings.socket_path)]
    ctx.emit({"command": version.current(), "plugins": plugins}, _render)
    return context.OK if any("version" in p for p in plugins) else context.PROBLEM
