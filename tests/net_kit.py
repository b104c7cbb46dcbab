"""What the network tests share: the tiny config as flags, and server / client subprocesses.

Every process is started with a timeout and killed by the test that started it if it is still
running at the end; addresses are loopback only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import config_kit
import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(data_dir, **extra) -> dict:
    """config_kit's tiny run (the Fashion-MNIST config on the tiny test ViT, one device, a few
    steps), with the network's timeouts long enough for a loaded test machine."""
    return config_kit.tiny_fields(
        data_dir, **{"net.idle_timeout": 120.0, "net.retry_seconds": 120.0, **extra}
    )


def apply_overrides(config, overrides: dict):
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for p in path:
            node = node[p]
        node[last] = value
    return config


def _flags(overrides: dict) -> list[str]:
    flags = ["--config", os.path.join(ROOT, "configs", "vit_fashion_mnist.py")]
    return flags + [f"--config.{k}={v}" for k, v in overrides.items()]


def env() -> dict:
    """This test run's environment, its compilation cache shared with the subprocesses."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("ADC_")}
    out["PYTHONPATH"] = ROOT
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        out["JAX_COMPILATION_CACHE_DIR"] = cache
        out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return out


class Proc:
    """A subprocess with its output in a file; :meth:`stop` kills it if it still runs."""

    def __init__(self, args: list[str], log_path: str, timeout: float):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "adc_jax.net", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=ROOT,
        )
        self.deadline = time.monotonic() + timeout

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait(self) -> int:
        try:
            return self.popen.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"timed out; output:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL: no chance to save anything (a crash)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        self.kill()
        self._log.close()


def start_server(workdir, overrides: dict, listen="127.0.0.1:0", extra=(), timeout=240.0):
    """A server process and its address, once it prints ``listening on``."""
    os.makedirs(workdir, exist_ok=True)
    args = ["server", *_flags(overrides), "--listen", listen, "--workdir", str(workdir)]
    proc = Proc([*args, *extra], os.path.join(str(workdir), "server.log"), timeout)
    while time.monotonic() < proc.deadline:
        for line in proc.output().splitlines():
            if line.startswith("listening on "):
                return proc, line.split()[-1]
        if proc.popen.poll() is not None:
            raise AssertionError(f"server exited:\n{proc.output()[-3000:]}")
        time.sleep(0.2)
    proc.stop()
    raise AssertionError("the server did not start listening in time")


def start_client(workdir, overrides: dict, server: str, token_file, extra=(), timeout=240.0):
    os.makedirs(workdir, exist_ok=True)
    args = ["client", *_flags(overrides), "--server", server, "--workdir", str(workdir)]
    args += ["--token_file", str(token_file), *extra]
    return Proc(args, os.path.join(str(workdir), "client.log"), timeout)


def read_jsonl(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = []
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return rows


def wait_for_step(workdir, step: int, proc: Proc) -> None:
    """Waits until the client in ``workdir`` logged a loss at ``step`` or later."""
    path = os.path.join(str(workdir), "metrics.jsonl")
    while time.monotonic() < proc.deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_jsonl(path)):
            return
        if proc.popen.poll() is not None:
            raise AssertionError(f"exited before step {step}:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in time")


def summary(workdir) -> dict:
    with open(os.path.join(str(workdir), "summary.json")) as f:
        return json.load(f)


# ---- Certificates ---------------------------------------------------------------------------


def make_certs(directory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM files),
    plus a second CA that signed neither; returns their paths by name."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths = {}

    def write(name, data):
        paths[name] = os.path.join(str(directory), f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(data)

    def key_pem(key):
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert(subject, key, issuer, issuer_key, ca, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    for ca_name in ("ca", "other_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        write(ca_name, cert(ca_name, ca_key, ca_name, ca_key, True))
        if ca_name == "ca":
            signing_key = ca_key
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name, names in (("server", san), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(f"{name}_key", key_pem(key))
        write(name, cert(name, key, "ca", signing_key, False, names))
    return paths
