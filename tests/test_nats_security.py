"""The worker against a nats-server that requires each kind of client
authentication: wrong credentials give `backoff` with an error naming the
cause, and streaming resumes once the setting is fixed and reloaded."""

import asyncio
import shutil
import ssl
import tempfile
from pathlib import Path

import nats
import psycopg
import pytest

import nats_security
from harness import Nats, wait_until


def settings_for(secured: nats_security.Secured, untrusted: bool = False) -> dict:
    """The wal_listener settings that present `secured`'s credentials."""
    if secured.mode == "user_password":
        return {"nats_user": secured.user, "nats_password": secured.password}
    if secured.mode == "token":
        return {"nats_token": secured.token}
    if secured.mode == "nkey":
        return {"nats_nkey_seed_file": secured.nkey_seed_file}
    if secured.mode == "jwt":
        return {"nats_credentials_file": secured.creds_file}
    cert, key = (secured.untrusted_cert_file, secured.untrusted_key_file) if untrusted else (secured.cert_file, secured.key_file)
    return {"nats_tls_ca_file": secured.ca_file, "nats_tls_cert_file": cert, "nats_tls_key_file": key, "nats_tls_required": "on"}


def wrong_settings(secured: nats_security.Secured, directory: Path) -> dict:
    """Credentials of the same kind that the server must refuse."""
    if secured.mode == "user_password":
        return settings_for(secured) | {"nats_password": "wrong"}
    if secured.mode == "token":
        return {"nats_token": "wrong"}
    if secured.mode == "tls":
        return settings_for(secured, untrusted=True)
    # An NKey or a JWT user of another operator.
    return settings_for(nats_security.MODES[secured.mode](directory / "other"))


async def _stored_rows(secured: nats_security.Secured, url: str) -> list[bytes]:
    options = {"user": secured.user or None, "password": secured.password or None, "token": secured.token or None}
    if secured.nkey_seed_file:
        options["nkeys_seed"] = str(secured.nkey_seed_file)
    if secured.creds_file:
        options["user_credentials"] = str(secured.creds_file)
    if secured.ca_file:
        context = ssl.create_default_context(cafile=str(secured.ca_file))
        context.load_cert_chain(str(secured.cert_file), str(secured.key_file))
        options["tls"] = context
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, **options)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("wal_listener")
        except nats.js.errors.NotFoundError:
            return []
        if info.state.messages == 0:
            return []
        return [(await js.get_msg("wal_listener", seq)).data for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await nc.close()


EXPECTED_CAUSE = {
    "user_password": "refused our credentials",
    "token": "refused our credentials",
    "nkey": "refused our credentials",
    "jwt": "refused our credentials",
    "tls": "does not trust our client certificate",
}


@pytest.mark.parametrize("mode", list(nats_security.MODES))
def test_authentication_mode(make_cluster, mode):
    directory = Path(tempfile.mkdtemp(prefix=f"wl-natssec-{mode}-"))
    secured = nats_security.MODES[mode](directory)
    server = Nats(config=secured.config)
    try:
        quoted = lambda settings: {k: f"'{v}'" for k, v in settings.items()}
        cluster = make_cluster(nats_url=f"'{server.url}'", **quoted(wrong_settings(secured, directory)))
        cluster.execute("CREATE EXTENSION wal_listener")
        status = wait_until(
            lambda: (s := cluster.status())["state"] == "backoff" and EXPECTED_CAUSE[mode] in (s["last_error"] or "") and s,
            60,
            f"backoff naming {EXPECTED_CAUSE[mode]!r}",
        )
        print(f"\n{mode}, wrong credentials: {status['last_error']}")
        if mode == "tls":
            # Our side does not trust the server's certificate.
            wrong_ca = secured.untrusted_cert_file.with_name("untrusted-ca.pem")
            cluster.set(**settings_for(secured) | {"nats_tls_ca_file": wrong_ca})
            status = wait_until(
                lambda: "TLS failed" in ((s := cluster.status())["last_error"] or "") and s, 60, "a TLS error"
            )
            assert status["state"] == "backoff"
            print(f"tls, server certificate not trusted: {status['last_error']}")

        cluster.set(**settings_for(secured))
        cluster.wait_for_state("streaming", timeout=60)
        cluster.execute("CREATE TABLE t (id int)")
        cluster.execute("INSERT INTO t VALUES (1)")
        rows = wait_until(lambda: asyncio.run(_stored_rows(secured, server.url)), 30, "the event")
        assert len(rows) == 1 and b'"data":{"id":1}' in rows[0]
    finally:
        server.destroy()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_bad_client_certificate_or_key_is_named_with_its_cause(make_cluster):
    directory = Path(tempfile.mkdtemp(prefix="wl-natssec-badcert-"))
    directory.chmod(0o755)
    secured = nats_security.mutual_tls(directory)
    server = Nats(config=secured.config)
    try:
        v1_cert, v1_key = nats_security.v1_client_certificate(directory)
        quoted = {k: f"'{v}'" for k, v in (settings_for(secured) | {"nats_tls_cert_file": v1_cert, "nats_tls_key_file": v1_key}).items()}
        cluster = make_cluster(nats_url=f"'{server.url}'", **quoted)
        cluster.execute("CREATE EXTENSION wal_listener")
        status = wait_until(
            lambda: (s := cluster.status())["state"] == "backoff" and "X.509 v1" in (s["last_error"] or "") and s,
            60,
            "backoff naming the v1 certificate",
        )
        assert str(v1_cert) in status["last_error"] and "-extfile" in status["last_error"]
        print(f"\nv1 certificate: {status['last_error']}")

        cluster.set(nats_tls_cert_file=secured.cert_file, nats_tls_key_file=secured.untrusted_key_file)
        status = wait_until(
            lambda: "is not the key of the certificate" in ((s := cluster.status())["last_error"] or "") and s,
            60,
            "backoff naming the key that does not match",
        )
        assert str(secured.untrusted_key_file) in status["last_error"]
        print(f"key of another certificate: {status['last_error']}")

        cluster.set(**settings_for(secured))
        cluster.wait_for_state("streaming", timeout=60)
    finally:
        server.destroy()
        shutil.rmtree(directory, ignore_errors=True)


def test_credentials_in_nats_url_are_never_logged_or_shown(make_cluster):
    directory = Path(tempfile.mkdtemp(prefix="wl-natssec-url-"))
    secured = nats_security.user_password(directory)
    server = Nats(config=secured.config)
    try:
        wrong = f"nats://wal:wrong-{secured.password}@127.0.0.1:1"
        cluster = make_cluster(nats_url=f"'{wrong}'")
        cluster.execute("CREATE EXTENSION wal_listener")
        status = wait_until(
            lambda: (s := cluster.status())["state"] == "backoff" and "cannot connect" in (s["last_error"] or "") and s,
            60,
            "backoff naming the URL",
        )
        assert "nats://wal:****@127.0.0.1:1" in status["last_error"], status["last_error"]
        assert cluster.execute("SHOW wal_listener.nats_url") == [{"wal_listener.nats_url": "nats://wal:****@127.0.0.1:1"}]

        cluster.set(nats_url=f"nats://wal:{secured.password}@127.0.0.1:{server.port}")
        cluster.wait_for_state("streaming", timeout=60)
        ours = [line for line in cluster.log().splitlines() if "wal_listener:" in line]
        assert any(f"wal:****@127.0.0.1:{server.port}" in line for line in ours), ours
        assert not any(secured.password in line for line in ours), "a worker log line shows the password"
        assert secured.password not in str(cluster.status())
    finally:
        server.destroy()
        shutil.rmtree(directory, ignore_errors=True)


def test_secrets_are_in_no_settings_view_for_a_plain_role_or_a_monitor(make_cluster, nats_server):
    """pg_settings' reset_val and boot_val bypass the show hook: a plain role
    read nats_url's password there, a pg_monitor member nats_token too."""
    password, token = "url-pass-7f3a", "tok-9c2e"
    cluster = make_cluster(nats_url=f"'nats://wal:{password}@127.0.0.1:{nats_server.port}'",
                           nats_token=f"'{token}'", nats_password="'pw-5b1d'")
    cluster.execute("CREATE ROLE plain LOGIN; CREATE ROLE monitor LOGIN IN ROLE pg_monitor")
    for role in ("plain", "monitor", "postgres"):
        with psycopg.connect(host=str(cluster.dir), port=cluster.port, user=role, dbname="app",
                             autocommit=True) as conn:
            rows = conn.execute("SELECT * FROM pg_settings WHERE name LIKE 'wal_listener.%'").fetchall()
            shown = conn.execute("SHOW ALL").fetchall()
            url = conn.execute("SELECT current_setting('wal_listener.nats_url')").fetchone()[0]
        text = f"{rows} {shown} {url}"
        for secret in (password, token, "pw-5b1d"):
            assert secret not in text, f"{role} reads {secret!r}: {text[:300]}"
        assert url == f"nats://wal:****@127.0.0.1:{nats_server.port}", url
