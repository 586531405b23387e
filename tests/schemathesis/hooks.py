"""Schemathesis hooks for tests/tests/sidecar_schema.rs (loaded through SCHEMATHESIS_HOOKS).

Endpoints the API accepts are registered in a real Consul agent, which then runs their checks.
An HTTP or TCP check would make Consul connect to whatever address the generator made up, and
tests send traffic to loopback only: every generated body that asks for such a check gets a
TTL check instead (TTL checks make no connection). Everything else is sent as generated.
"""
import schemathesis


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        check = body.get("check")
        if isinstance(check, dict) and ("http" in check or "tcp" in check):
            body = dict(body)
            body["check"] = {"ttl": "30s"}
    return body
