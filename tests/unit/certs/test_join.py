"""How `join` reads a SuperNode's end: a refusal by the SuperLink stops it, anything else is retried."""

from __future__ import annotations

from client.join import refusal_in_log

# What Flower 1.42's SuperNode prints when the SuperLink refuses its activation (exit code 305).
REFUSED = """INFO :      Starting Flower SuperNode
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.

For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>
"""


def test_an_activation_refusal_is_explained() -> None:
    reason = refusal_in_log(REFUSED)
    assert reason is not None
    assert "[code: 2004] Failed to activate SuperNode." in reason
    assert "not registered, or revoked" in reason
    assert "For more information" not in reason


def test_other_endings_are_not_refusals() -> None:
    assert refusal_in_log("INFO :      SuperNode ID: 42\nINFO :      SuperNode terminated gracefully.\n") is None
    assert refusal_in_log("") is None
