"""TLS on every hop, with a CA made by the test: client → hub over https, worker → hub over wss, proxy →
hub over https with ``ca_file``; a certificate from another CA is refused on each hop, and accepted
only with ``allow_invalid_certs``."""

from __future__ import annotations

import logging
import ssl
import subprocess
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from conftest import WAIT_S, Grid, chat, eventually, ghubai_command
from ghubai.config import ConfigError, load, parse
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.hub.app import run as run_hub
from ghubai.observability.service import Service
from ghubai.proxy.server import run as run_proxy
from ghubai.registry.server import run as run_registry


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, str]:
    """A CA, a certificate it signed for 127.0.0.1, and another CA that signed nothing here."""
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": tmp_path / "hub.pem", "key": tmp_path / "hub.key", "ca": tmp_path / "ca.pem",
             "stranger": tmp_path / "stranger.pem"}
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["stranger"]))
    return {name: str(path) for name, path in files.items()}


async def test_every_hop_speaks_tls_with_the_grids_own_ca(grid: Grid, tls: dict[str, str]) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub(tls_cert=tls["cert"], tls_key=tls["key"])
    assert hub.value.startswith("https://")
    await grid.worker(hub.value, sim_url, ca_file=tls["ca"])
    proxy = await grid.proxy(hubs=(hub.value,), ca_file=tls["ca"])
    await grid.wait_for_model(proxy.value, "sim")
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls["ca"]), timeout=WAIT_S) as client:
        direct = await client.post(hub.value + "/v1/chat/completions", json=chat())
    assert direct.status_code == 200
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200


async def test_a_hub_url_whose_scheme_is_upper_case_is_dialled_over_tls_too(grid: Grid, tls: dict[str, str]) -> None:
    """Regression (hunt): WSS:// passed ``ghubai check`` and was dialled in the clear, the provider
    token with it."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub(tls_cert=tls["cert"], tls_key=tls["key"])
    linked = await grid.worker("WSS://" + hub.value.removeprefix("https://"), sim_url, ca_file=tls["ca"])
    assert linked.value.welcomed.is_set()  # (it waits for the hub's welcome, which only TLS gets)


async def test_a_certificate_from_another_ca_is_refused_on_each_hop(grid: Grid, tls: dict[str, str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub(tls_cert=tls["cert"], tls_key=tls["key"])
    doubter = await grid.worker(hub.value, sim_url, ca_file=tls["stranger"], wait=False, name="doubter")
    proxy = await grid.proxy(hubs=(hub.value,), ca_file=tls["stranger"])
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls["stranger"]), timeout=WAIT_S) as client:
        with pytest.raises(httpx.ConnectError) as refused:
            await client.get(hub.value + "/health")
    cause: BaseException | None = refused.value
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None, "the refusal is the certificate's"

    async def proxy_says_down() -> bool:
        health = (await grid.http.get(proxy.value + "/health")).json()
        return health["hubs"][0]["up"] is False and "CERTIFICATE_VERIFY_FAILED" in health["hubs"][0]["reason"]

    await eventually(proxy_says_down, "the proxy to refuse the hub's certificate")
    # (a hunt: a hub never up was down without a word in the proxy's log, and ghubai status said "ConnectError")
    assert any("is not up: " in record.getMessage() and "CERTIFICATE_VERIFY_FAILED" in record.getMessage()
               for record in caplog.records)
    done = await trio.run_process(ghubai_command("status", "--hub", hub.value, "--ca-file", tls["stranger"]),
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 1 and b"CERTIFICATE_VERIFY_FAILED" in done.stderr, done.stderr

    async def worker_refused() -> bool:
        return any("link to wss://" in record.getMessage() and "CERTIFICATE_VERIFY_FAILED" in record.getMessage()
                   for record in caplog.records)

    await eventually(worker_refused, "the worker to refuse the hub's certificate")
    assert not doubter.value.welcomed.is_set()


async def test_allow_invalid_certs_accepts_a_certificate_from_another_ca(grid: Grid, tls: dict[str, str],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub(tls_cert=tls["cert"], tls_key=tls["key"])
    await grid.worker(hub.value, sim_url, ca_file=tls["stranger"], allow_invalid_certs=True)
    proxy = await grid.proxy(hubs=(hub.value,), ca_file=tls["stranger"], allow_invalid_certs=True)
    await grid.wait_for_model(proxy.value, "sim")
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls["ca"]), timeout=WAIT_S) as client:
        await workers_linked_over(client, hub.value)
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200
    assert any("certificates are not checked" in record.getMessage() for record in caplog.records)


async def workers_linked_over(client: httpx.AsyncClient, hub_url: str) -> None:
    async def linked() -> bool:
        return len((await client.get(hub_url + "/api/registry")).json()["workers"]) == 1

    await eventually(linked, "the worker linked over wss")



async def test_a_certificate_file_that_holds_its_key_serves_every_role_and_a_key_alone_is_refused(
        grid: Grid, tls: dict[str, str], tmp_path: Path) -> None:
    """Regression (operator's path): with tls_cert a file holding the key too and no tls_key, the
    proxy served HTTPS but hub and registry died with "no such file"; and tls_key without tls_cert
    passed ``check`` while every role served plain HTTP."""
    combined = tmp_path / "combined.pem"
    combined.write_text(Path(tls["cert"]).read_text() + Path(tls["key"]).read_text())
    hub = await grid.hub(tls_cert=str(combined))
    registry = await grid.registry(tls_cert=str(combined), hubs=())
    proxy = await grid.proxy(hubs=(hub.value,), ca_file=tls["ca"], tls_cert=str(combined))
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls["ca"]), timeout=WAIT_S) as client:
        for url in (hub.value, registry.value, proxy.value):
            assert url.startswith("https://") and (await client.get(url + "/health")).status_code == 200, url
    for role in ("hub", "registry", "proxy"):
        with pytest.raises(ConfigError, match="tls_key: given without tls_cert"):
            parse(role, f'tls_key = "{tls["key"]}"')


async def test_status_reads_a_tls_hub_with_the_grids_ca(grid: Grid, tls: dict[str, str]) -> None:
    """Regression (hunt): every daemon takes ``ca_file``, but ``ghubai status`` could not read a hub
    served with the grid's own CA (CERTIFICATE_VERIFY_FAILED, and no flag to fix it)."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub(tls_cert=tls["cert"], tls_key=tls["key"])
    await grid.worker(hub.value, sim_url, ca_file=tls["ca"])
    for trust in (["--ca-file", tls["ca"]], ["--allow-invalid-certs"], []):
        done = await trio.run_process(ghubai_command("status", "--hub", hub.value, *trust), capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert done.returncode == (0 if trust else 1), (trust, done.stderr.decode()[-400:])


@pytest.mark.parametrize("role", ["hub", "registry", "proxy"])
def test_check_refuses_tls_files_the_daemon_would_refuse_and_names_the_keys(tls: dict[str, str], tmp_path: Path,
                                                                             role: str) -> None:
    """Regression (hunt): a forgotten ``tls_key``, another pair's key, cert and key swapped, an
    encrypted key passed ``ghubai check``; the daemon then died with "TLS certificate or key
    refused: [SSL] PEM lib (_ssl.c:3926)", a line that names no key."""
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text(_encrypted_key(tls["key"]))
    for cert, key in ((tls["cert"], ""), (tls["cert"], str(other)), (tls["key"], tls["cert"]),
                      (tls["cert"], str(encrypted))):
        text = f'tls_cert = "{cert}"\n' + (f'tls_key = "{key}"\n' if key else "")
        with pytest.raises(ConfigError, match=r"tls_cert, tls_key: not a certificate and its private key"):
            parse(role, text, str(tmp_path / f"{role}.toml"))
    parse(role, f'tls_cert = "{tls["cert"]}"\ntls_key = "{tls["key"]}"\n', str(tmp_path / f"{role}.toml"))
    if role == "proxy":
        with pytest.raises(ConfigError, match=r"ca_file: not a bundle of PEM certificates"):
            parse(role, f'ca_file = "{tmp_path / "other.key"}"\n', str(tmp_path / "proxy.toml"))


def _encrypted_key(path: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret")).decode()


def test_relative_tls_paths_are_read_beside_the_config_file_wherever_the_daemon_runs(
        tls: dict[str, str], tmp_path: Path) -> None:
    """Regression (hunt): ``tls_cert = "hub.pem"`` passed ``ghubai check`` run in /etc/ghubai, and
    the daemon, which systemd runs in /, found no such file. Relative paths are now the config
    file's folder's, for ``check`` and daemon alike."""
    config = Path(tls["cert"]).parent / "hub.toml"
    config.write_text('listen = "127.0.0.1:0"\ntls_cert = "hub.pem"\ntls_key = "hub.key"\n')
    check = subprocess.run(ghubai_command("check", str(config)), capture_output=True, text=True, timeout=60, cwd="/")
    assert check.returncode == 0, check.stdout + check.stderr
    assert parse("hub", config.read_text(), str(config)).tls_cert == tls["cert"]
    assert parse("proxy", 'ca_file = "ca.pem"', str(config)).ca_file == tls["ca"]


@pytest.mark.parametrize("secure", [False, True])
async def test_a_hub_that_refuses_a_large_body_early_stays_up_at_the_proxy(grid: Grid, tls: dict[str, str],
                                                                             secure: bool) -> None:
    """Regression (review): a hub that answered 401 (a wrong key) before reading a 3 MiB body, and closed,
    was marked down by the proxy over https: the broken send breaks a TLS stream, its answer unread, and
    the proxy took that for a dead hub, for every client, until its next check. Over http the client gets
    the 401; over https a 502 that says why, and the hub stays up."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub(api_keys=("k",), **({"tls_cert": tls["cert"], "tls_key": tls["key"]} if secure else {}))
    await grid.worker(hub.value, sim_url, **({"ca_file": tls["ca"]} if secure else {}))
    proxy = await grid.proxy(hubs=(hub.value,), **({"ca_file": tls["ca"]} if secure else {}))
    await grid.wait_for_model(proxy.value, "sim")
    response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content="x" * (3 << 20)),
                                    headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401 or secure and response.status_code == 502, response.text
    assert response.status_code == 401 or "before it took the whole request" in response.text  # (no other hub)
    assert (await grid.http.get(proxy.value + "/health")).json()["hubs"][0]["up"]


async def test_a_reload_serves_a_renewed_certificate_to_new_connections(
        tls: dict[str, str], tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (operator's path): certbot renews a certificate in place every 60 days or so; a
    reload checked the new files but went on serving the old ones, and only a restart, which drops
    every client and every worker's link, served them. A pair that does not match keeps the old."""
    caplog.set_level(logging.INFO)
    services, urls = {}, {}
    for role, run, extra in (("hub", run_hub, ""), ("proxy", run_proxy, 'hubs = []\nregistry_url = ""\n'),
                             ("registry", None, "hubs = []\n")):
        path = tmp_path / f"{role}.toml"
        path.write_text(f'listen = "127.0.0.1:0"\ntls_cert = "{tls["cert"]}"\ntls_key = "{tls["key"]}"\n{extra}')
        services[role] = Service({})
        config = load(role, str(path))
        start = partial(run_registry, config, str(path)) if run is None else partial(run, config, path=str(path))
        urls[role] = await nursery.start(partial(start, service=services[role]))
    renewal, renewal_ca = trustme.CA(), str(tmp_path / "renewal.pem")
    renewal.cert_pem.write_to_path(renewal_ca)
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls["ca"]), timeout=WAIT_S) as kept:
        for url in urls.values():
            assert (await kept.get(url + "/health")).status_code == 200
        renewed = renewal.issue_cert("127.0.0.1")
        renewed.cert_chain_pems[0].write_to_path(tls["cert"])
        renewed.private_key_pem.write_to_path(tls["key"])
        for service in services.values():
            service.reloaded()
        assert caplog.text.count("the TLS certificate read again from") == 3
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=tls["ca"]), timeout=WAIT_S) as old, \
                httpx.AsyncClient(verify=ssl.create_default_context(cafile=renewal_ca), timeout=WAIT_S) as new:
            for role, url in urls.items():
                assert (await new.get(url + "/health")).status_code == 200, role
                assert (await kept.get(url + "/health")).status_code == 200, role  # (its connection keeps its own)
                with pytest.raises(httpx.ConnectError):  # (the certificate: the port serves the others)
                    await old.get(url + "/health")

    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(tls["cert"])  # (not the key's)
    for service in services.values():
        service.reloaded()
    assert caplog.text.count("not a certificate and its private key") >= 3
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=renewal_ca), timeout=WAIT_S) as new:
        for role, url in urls.items():
            assert (await new.get(url + "/health")).status_code == 200, role


async def _cut_after(port: int) -> float:
    """How long the server at ``port`` keeps a connection that sent half a ClientHello (fake clock)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, and nothing more
        began = trio.current_time()
        with trio.fail_after(300):
            assert await stream.receive_some(1024) == b""
        return trio.current_time() - began


async def test_a_tls_handshake_that_stalls_is_cut_within_the_header_timeout(tls: dict[str, str],
                                                                             autojump_clock: trio.abc.Clock) -> None:
    """Regression (left alone before): a client that opened connections and sent half a ClientHello
    held each for a minute at a hub or registry (hypercorn's 60 s for a handshake) and for 75 s at the
    proxy (its idle timeout): a connection cap of 10,000 filled at 130-170 connections a second. Each
    cuts it as the proxy cuts a request head that trickles in, in 10 s."""
    from ghubai.web import serve_app, server_config

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        raise AssertionError("no request gets through a handshake that never ends")

    config = server_config("127.0.0.1:0", tls_cert=tls["cert"], tls_key=tls["key"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["cert"], tls["key"])
    serve = partial(serve_connection, handle=app, idle_timeout_s=75.0, header_timeout_s=10.0)
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(serve_app, app, config)
        listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1", https_compatible=True)
        await nursery.start(trio.serve_listeners, serve, listeners)
        assert await _cut_after(int(url.rsplit(":", 1)[1])) <= 10.5  # the hub's
        assert await _cut_after(listeners[0].transport_listener.socket.getsockname()[1]) <= 10.5  # the proxy's
        nursery.cancel_scope.cancel()


async def test_an_engine_whose_certificate_the_worker_does_not_trust_is_named_so(
        grid: Grid, tls: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """Regression (engine hunt): an https engine whose certificate the worker did not trust (its
    ca_file is for wss:// hubs; the engine's CAs are the system's or SSL_CERT_FILE's) was "the engine
    does not answer (ConnectError)", as a dead one, in the log and to clients alike."""
    async def engine(conn: Connection, request: Request) -> None:
        await conn.respond_json(200, {"models": [{"name": "m"}]})

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["cert"], tls["key"])
    listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1", https_compatible=True)
    await grid.nursery.start(trio.serve_listeners, partial(serve_connection, handle=engine), listeners)
    hub = await grid.hub()
    caplog.set_level(logging.WARNING, logger="ghubai.worker")
    port = listeners[0].transport_listener.socket.getsockname()[1]
    worker = await grid.worker(hub.value, f"https://127.0.0.1:{port}")
    problem = worker.value.offer.problem
    assert "the engine's TLS certificate is not trusted" in problem and "SSL_CERT_FILE" in problem, problem
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text, caplog.text  # (the log has the TLS library's words)
