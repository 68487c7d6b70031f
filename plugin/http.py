"""The HTTP face of the plugin: decode, dispatch through routes.ROUTES, encode. The only place that writes
`Err`/`Error`.

Every call is `POST /<Receiver>.<Method>` with a JSON body (dockerd sends no Content-Type, so the body is parsed
whatever the header says). Errors: status from the error class, body `{"Err": msg, "Error": msg}`: the network
driver reads `Err`, the IPAM client reads `Error` (and on 200 ignores `Err`), so both are always set and the
status is never 200.
"""

import json
import logging
import time
from typing import Mapping

from flask import Flask, Response, request

from plugin.routes import ROUTES
from store.schema import SCHEMA_MAJOR, SCHEMA_MINOR
from telemetry.metrics import PLUGIN_CALL_SECONDS, PLUGIN_CALLS
from wire import version
from wire.errors import InvalidRequest, VxnetError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
VERSION_PATH = "/vxnet/version"  # GET; outside the protocol's /<Receiver>.<Method> names, so it can clash with none


def _reply(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type=CONTENT_TYPE)


def _error(message: str, status: int) -> Response:
    return _reply({"Err": message, "Error": message}, status)


def make_app(drivers: Mapping[str, object]) -> Flask:
    """drivers: receiver name ("NetworkDriver", "IpamDriver") -> driver object with one method per call."""
    app = Flask("vxnet")

    @app.post("/Plugin.Activate")
    def activate():
        return _reply({"Implements": [name for name in drivers]})

    @app.get(VERSION_PATH)
    def version_info():
        """Not a call dockerd makes: `vxnet version` asks which vxnet answers on this socket.
        Reply: {"Version": "0.2.0", "Schema": "1.1"} (wire/version.py, store/schema.py SCHEMA_MAJOR/MINOR)."""
        return _reply({"Version": version.current(), "Schema": f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"})

    @app.route("/<path:call>", methods=["GET", "POST", "PUT", "DELETE"])
    def dispatch(call: str):
        route = ROUTES.get("/" + call)
        if route is None or route.receiver not in drivers:
            return _error(f"unknown call /{call}", 404)
        if request.method != "POST":
            return _error(f"/{call} takes POST", 405)
        started = time.monotonic()
        name = f"{route.receiver}.{route.method}"
        outcome = "internal"
        try:
            raw = request.get_data(cache=False)
            # The request as dockerd sent it, at debug only: how the wire facts in docs and wire/protocol.py
            # (e.g. CreateEndpoint's exposed ports) are checked against a real dockerd.
            log.debug("%s request %s", name, raw[:4096].decode("utf-8", "backslashreplace"))
            try:
                body = json.loads(raw) if raw.strip() else None
            except ValueError as exc:  # UnicodeDecodeError too
                raise InvalidRequest(f"request body: not JSON: {exc}") from None
            except RecursionError:
                raise InvalidRequest("request body: JSON nested too deeply") from None
            req = route.decoder.decode(body)
            reply = getattr(drivers[route.receiver], route.handler_name)(req)
            outcome = "ok"
        except VxnetError as exc:
            outcome = type(exc).__name__
            log.warning("%s.%s failed (%d): %s", route.receiver, route.method, exc.status, exc)
            return _error(str(exc), exc.status)
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("%s.%s crashed", route.receiver, route.method)
            return _error(f"internal error in {route.method}: {type(exc).__name__}: {exc}", 500)
        finally:
            elapsed = time.monotonic() - started
            PLUGIN_CALLS.labels(method=name, outcome=outcome).inc()
            PLUGIN_CALL_SECONDS.labels(method=name).observe(elapsed)
        log.debug("%s.%s ok in %.1f ms", route.receiver, route.method, elapsed * 1000)
        return _reply(reply or {})

    return app
