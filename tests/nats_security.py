"""nats-server configurations for each client authentication mode, with the
matching client-side secrets, for end-to-end tests.

Each mode function writes into `directory` whatever keys, certificates or
credentials the client needs and returns them as a `Secured`, with the
server configuration to run `harness.Nats` with. Keys are made with the `nkeys` package (which nats-py
needs anyway to log in with an nkey or a .creds file) and certificates with
the `openssl` CLI.

Files are world-readable because the extension reads them as the `postgres`
OS user; `directory` and its parents must be traversable by that user too.
"""

import base64
import hashlib
import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys


@dataclass
class Secured:
    """A server config plus what a client needs to pass its check; only the
    fields of the chosen mode are set."""

    mode: str
    # nats-server configuration text (authorization, operator or tls block).
    config: str
    user: str = ""
    password: str = ""
    token: str = ""
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # A client certificate from a CA the server does not trust.
    untrusted_cert_file: Path | None = None
    untrusted_key_file: Path | None = None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


def _config(directory: Path, body: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    return body


def user_password(directory: Path, user: str = "wal", password: str | None = None) -> Secured:
    password = password or secrets.token_hex(12)
    body = f"authorization {{ user: {json.dumps(user)}, password: {json.dumps(password)} }}"
    return Secured("user_password", _config(directory, body), user=user, password=password)


def token(directory: Path, value: str | None = None) -> Secured:
    value = value or secrets.token_hex(16)
    body = f"authorization {{ token: {json.dumps(value)} }}"
    return Secured("token", _config(directory, body), token=value)


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def nkey(directory: Path) -> Secured:
    kp = _keypair(nkeys.PREFIX_BYTE_USER)
    body = f"authorization {{ users = [ {{ nkey: {kp.public_key.decode()} }} ] }}"
    config = _config(directory, body)
    return Secured("nkey", config, nkey_seed_file=_write(directory / "user.nk", kp.seed.decode() + "\n"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict) -> str:
    """A nats-jwt v2 token: ed25519 signature by `issuer` over header.claims."""
    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject}
    # jti as nats-jwt computes it: SHA-512/256 of the standard claims alone.
    jti = base64.b32encode(hashlib.new("sha512_256", _json(claims)).digest()).rstrip(b"=").decode()
    claims = {"jti": jti, **claims, "nats": {**nats_claims, "version": 2}}
    to_sign = f"{_b64(_json({'typ': 'JWT', 'alg': 'ed25519-nkey'}))}.{_b64(_json(claims))}"
    return f"{to_sign}.{_b64(issuer.sign(to_sign.encode()))}"


def jwt_creds(directory: Path) -> Secured:
    """Decentralized auth: self-signed operator, an account it signs with
    JetStream allowed, and a user the account signs, given as a .creds file."""
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    operator_pub = operator.public_key.decode()
    unlimited = {"subs": -1, "data": -1, "payload": -1}
    account_limits = {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    # JetStream is off for an account whose JWT has no storage limits.
    js_limits = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    accounts = {}
    for name, limits in (("SYS", account_limits), ("APP", {**account_limits, **js_limits})):
        kp = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        accounts[name] = (kp, _jwt(operator, kp.public_key.decode(), name, {"limits": limits, "type": "account"}))
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    # Absent user limits would read as 0 (nothing allowed), so spell out "unlimited".
    user_claims = {"pub": {}, "sub": {}, **unlimited, "type": "user"}
    user_jwt = _jwt(accounts["APP"][0], user.public_key.decode(), "app-user", user_claims)
    preload = "".join(f'  {kp.public_key.decode()}: "{jwt}"\n' for kp, jwt in accounts.values())
    # JetStream will not start in operator mode without a system account.
    body = (
        f'operator: "{_jwt(operator, operator_pub, "test-operator", {"type": "operator"})}"\n'
        f"system_account: {accounts['SYS'][0].public_key.decode()}\n"
        f"resolver: MEMORY\nresolver_preload: {{\n{preload}}}"
    )
    creds = (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    config = _config(directory, body)
    return Secured("jwt", config, creds_file=_write(directory / "user.creds", creds))


def _cert(directory: Path, name: str, extensions: list[str], ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A P-256 certificate and key, self-signed (a CA) or signed by `ca`."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    # `req -x509` adds the config's basicConstraints CA:TRUE, so leaves must
    # override it: rustls refuses a CA certificate as an end entity.
    issuer = ["-CA", str(ca[0]), "-CAkey", str(ca[1])] if ca else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}", *issuer,
         *(arg for ext in extensions for arg in ("-addext", ext))],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o644)
    return cert, key


def mutual_tls(directory: Path) -> Secured:
    """TLS where the server also verifies the client's certificate. The
    server certificate names both 127.0.0.1 and localhost, since clients check
    the host they dialled against the subjectAltName."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _cert(directory, "ca", ["keyUsage=critical,keyCertSign,cRLSign"])
    leaf = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature"]
    server_ext = [*leaf, "extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    server = _cert(directory, "server", server_ext, ca)
    client = _cert(directory, "client", [*leaf, "extendedKeyUsage=clientAuth"], ca)
    untrusted_ca = _cert(directory, "untrusted-ca", ["keyUsage=critical,keyCertSign,cRLSign"])
    untrusted = _cert(directory, "untrusted-client", [*leaf, "extendedKeyUsage=clientAuth"], untrusted_ca)
    files = {"cert_file": server[0], "key_file": server[1], "ca_file": ca[0]}
    body = "tls {\n" + "".join(f"  {k}: {json.dumps(str(v))}\n" for k, v in files.items()) + "  verify: true\n}"
    return Secured(
        "tls",
        _config(directory, body),
        ca_file=ca[0],
        cert_file=client[0],
        key_file=client[1],
        untrusted_cert_file=untrusted[0],
        untrusted_key_file=untrusted[1],
    )


MODES = {"user_password": user_password, "token": token, "nkey": nkey, "jwt": jwt_creds, "tls": mutual_tls}


def v1_client_certificate(directory: Path) -> tuple[Path, Path]:
    """A client certificate made the common way, `openssl x509 -req` with no
    extensions file, signed by the CA of `mutual_tls(directory)`: X.509 v1."""
    key, csr, cert = directory / "v1-key.pem", directory / "v1.csr", directory / "v1.pem"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", "/CN=v1-client"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(directory / "ca.pem"),
                    "-CAkey", str(directory / "ca-key.pem"), "-CAcreateserial", "-days", "2", "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    key.chmod(0o644)
    cert.chmod(0o644)
    return cert, key
