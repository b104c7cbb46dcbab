r"""Command line: the server and the clients of a split-learning run, as separate processes.

    python -m adc_jax.net server --config CFG [--config.x=...] --listen HOST:PORT --workdir W \
        [--token_file F] [--tls_cert C --tls_key K [--tls_client_ca CA]] [--insecure]
    python -m adc_jax.net client --config CFG [--config.x=...] --server HOST:PORT --workdir W \
        --token_file F [--client_index I] [--tls_ca CA [--tls_cert C --tls_key K]] [--insecure]

The server prints ``listening on HOST:PORT`` as soon as it accepts connections (``--listen`` with
port 0 picks a free port). Without ``--token_file`` it writes a new random token to
``W/token``; every client needs that file (or the token in ``$ADC_NET_TOKEN``). Plaintext is
allowed on loopback addresses only, unless ``--insecure``. See docs/network.md.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adc_jax import runs
from adc_jax.net import transport

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (the same on every side).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of this process.")
_LISTEN = flags.DEFINE_string("listen", None, "server: HOST:PORT to listen on (port 0: any).")
_SERVER = flags.DEFINE_string("server", None, "client: HOST:PORT of the server.")
_CLIENT_INDEX = flags.DEFINE_integer("client_index", 0, "client: index in [0, net.num_clients).")
_TOKEN_FILE = flags.DEFINE_string(
    "token_file", None, "File holding the shared token (server default: a new one in W/token)."
)
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate of this side.")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key of this side.")
_TLS_CA = flags.DEFINE_string("tls_ca", None, "client: PEM CA that signed the server's cert.")
_TLS_CLIENT_CA = flags.DEFINE_string(
    "tls_client_ca", None, "server: require client certificates signed by this PEM CA (mTLS)."
)
_TLS_SERVER_NAME = flags.DEFINE_string(
    "tls_server_name", None, "client: the name in the server's certificate (default: its host)."
)
_INSECURE = flags.DEFINE_bool(
    "insecure", False, "Allow plaintext (no TLS) on an address other than loopback."
)


def _token(path: str | None, workdir: str, create: bool) -> str:
    if path:
        with open(path) as f:
            token = f.read().strip()
        if not token:
            raise app.UsageError(f"The token file {path} is empty.")
        return token
    if os.environ.get("ADC_NET_TOKEN"):
        return os.environ["ADC_NET_TOKEN"]
    if not create:
        raise app.UsageError(
            "The client needs the server's token: --token_file (the server's W/token) or "
            "$ADC_NET_TOKEN."
        )
    path = os.path.join(workdir, "token")
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    print(f"token in {path} (clients: --token_file {path})", flush=True)
    return _token(path, workdir, create)


def _check_plaintext(address: str, tls: bool) -> None:
    host, _ = transport.parse_address(address)
    if not tls and not transport.is_loopback(host) and not _INSECURE.value:
        raise app.UsageError(
            f"{address} is not a loopback address and no TLS is set: the token and the "
            "activations would cross the network in clear. Give --tls_cert/--tls_key (server) "
            "and --tls_ca (client), or --insecure."
        )


def _serve(config, workdir: str) -> None:
    from adc_jax.net.server import SplitServer

    if not _LISTEN.value:
        raise app.UsageError("server needs --listen HOST:PORT.")
    credentials = transport.server_credentials(
        _TLS_CERT.value, _TLS_KEY.value, _TLS_CLIENT_CA.value
    )
    _check_plaintext(_LISTEN.value, credentials is not None)
    token = _token(_TOKEN_FILE.value, workdir, create=True)
    server = SplitServer(config, workdir, token=token, credentials=credentials)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.request_stop("signal"))
    address = server.start(_LISTEN.value)
    print(f"listening on {address}", flush=True)
    summary = server.wait()
    print(f"server stopped ({summary['stop_reason']}) after {summary['server_steps']} steps.")


def _client(config, workdir: str) -> None:
    from adc_jax.net.client import NetError, SplitClient

    if not _SERVER.value:
        raise app.UsageError("client needs --server HOST:PORT.")
    credentials = transport.channel_credentials(_TLS_CA.value, _TLS_CERT.value, _TLS_KEY.value)
    _check_plaintext(_SERVER.value, credentials is not None)
    token = _token(_TOKEN_FILE.value, workdir, create=False)
    client = SplitClient(
        config,
        _SERVER.value,
        workdir,
        token=token,
        client_index=_CLIENT_INDEX.value,
        credentials=credentials,
        server_name=_TLS_SERVER_NAME.value,
    )
    try:
        client.run()
    except NetError as e:
        sys.exit(f"client {_CLIENT_INDEX.value}: {e}")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("server", "client"):
        raise app.UsageError("Usage: python -m adc_jax.net {server,client} --config CFG ...")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    run = _serve if argv[1] == "server" else _client
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError, runs.RunError) as e:  # a bad address, config value or file,
        sys.exit(f"{argv[1]}: {e}")  # a diverged run: one paragraph, no traceback


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
