"""Flower's `flower-supernode`, asking the SuperLink for new messages every `--idle-poll` seconds.

Flower 1.42's SuperNode pulls a message, runs it, pushes the reply, and when a pull finds nothing it
sleeps a fixed 3 s before the next (`flwr/supernode/start_client_internal.py`). The coordinator sends a
round's messages just after the previous round's replies came in, so every exchange (each round's
training and each evaluation) starts up to 3 s late at the sites: on short rounds that is about half
of a round's time. This launcher runs Flower's own SuperNode entry point unchanged except that those
sleeps last at most `--idle-poll` seconds (never longer than Flower's). A pull is one small request
on the uplink's kept-alive connection, not a new TLS handshake, so polling more often costs little.

Run as `python -m client.supernode_poll --idle-poll S flower-supernode ARGS...`: the program name
stays in the command line, where operators (and `ps`) look for the SuperNode.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

PROGRAM = "flower-supernode"
# Flower's idle sleep between pulls that found nothing (seconds); the launcher never waits longer.
FLOWER_IDLE_POLL_S = 3.0
DEFAULT_IDLE_POLL_S = 1.0


class CappedSleep:
    """A stand-in for the `time` module inside Flower's SuperNode loop: `sleep` is capped at `cap_s`,
    every other attribute is the real `time` module's."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def cap_idle_poll(cap_s: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop at `cap_s` seconds (in this process)."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        # Another Flower release: its loop no longer sleeps through the module-level `time`; run it as is.
        print(f"{PROGRAM}: cannot shorten this Flower's idle poll; using its own", file=sys.stderr)
        return
    start_client_internal.time = CappedSleep(cap_s)  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if PROGRAM not in args:
        raise SystemExit(f"usage: python -m client.supernode_poll [--idle-poll S] {PROGRAM} ARGS...")
    at = args.index(PROGRAM)
    # Only what comes before the program name is ours: Flower's arguments pass through untouched.
    parser = argparse.ArgumentParser(prog="client.supernode_poll", allow_abbrev=False)
    parser.add_argument("--idle-poll", type=float, default=DEFAULT_IDLE_POLL_S,
                        help="seconds between pulls that find no message (at most Flower's 3)")
    own = parser.parse_args(args[:at])
    if not own.idle_poll > 0:
        parser.error("--idle-poll must be positive")
    cap_idle_poll(min(own.idle_poll, FLOWER_IDLE_POLL_S))
    from flwr.supernode.cli import flower_supernode

    sys.argv = [PROGRAM, *args[at + 1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
