"""Command-line flags that can also be set by environment variables (for containers).

Each flag --some-name of a process with prefix P reads P_SOME_NAME when not given on the
command line; --help shows the variable beside every flag.
"""

from __future__ import annotations

import argparse
import os


class FlagParser(argparse.ArgumentParser):
    def __init__(self, env_prefix: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)
        self.env_prefix = env_prefix

    def flag(self, name: str, *, default=None, type=str, help: str, **kwargs) -> None:
        env = self._env(name)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = type(raw)
            except (TypeError, ValueError) as e:
                self.error(f"environment variable {env}={raw!r}: {e}")
        self.add_argument(name, default=default, type=type, help=f"{help} [env {env}]", **kwargs)

    def switch(self, name: str, *, help: str) -> None:
        """An on/off flag: --name / --no-name, or P_NAME=true|false (default off)."""
        env = self._env(name)
        raw = os.environ.get(env, "false").strip().lower()
        if raw not in ("true", "false", "1", "0", ""):
            self.error(f"environment variable {env}={raw!r}: expected true or false")
        self.add_argument(
            name, action=argparse.BooleanOptionalAction, default=raw in ("true", "1"), help=f"{help} [env {env}]"
        )

    def _env(self, name: str) -> str:
        return f"{self.env_prefix}_{name.lstrip('-').upper().replace('-', '_')}"


def add_server_flags(parser: FlagParser, default_port: int) -> None:
    parser.flag("--host", default="0.0.0.0", help="address to listen on")
    parser.flag("--port", default=default_port, type=int, help="port to listen on; 0 picks a free one")
    parser.flag("--max-sessions", default=16, type=int, help="most concurrent sessions; more get RESOURCE_EXHAUSTED")
    parser.flag("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.flag(
        "--shutdown-grace",
        default=30.0,
        type=float,
        help="on SIGTERM: health goes NOT_SERVING and new streams are refused at once; "
        "streams in flight get this many seconds to finish",
    )
    parser.flag("--tls-cert", default="", help="serve TLS with this certificate (PEM); empty = plaintext")
    parser.flag("--tls-key", default="", help="the private key (PEM) of --tls-cert")
    parser.flag(
        "--tls-client-ca", default="",
        help="require clients to present a certificate signed by this CA (PEM): mutual TLS",
    )  # fmt: skip
