"""The store on a Redis set up as managed services are (journey 41), with real redis-server
processes: TLS with a private CA and client certificates, a Sentinel that fails the primary over,
an ACL user with only the commands docs/operations.md lists, a cluster (refused). The URLs alone,
without a server: tests/service/test_redis_conn.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.crc

from service.store import (
    _INFO_KEYS,
    CLUSTER_REFUSAL,
    Event,
    EventRate,
    RedisStore,
    Served,
    StoreConfigError,
    StoreUnavailable,
    read_erasures,
    read_served,
    read_stream_checked,
)
from tests.conftest import IN_CI, ROOT
from tests.service.conftest import REDIS_BIN, free_port, needs_redis, port_free, stop_process, wait_for

pytestmark = [pytest.mark.asyncio, *needs_redis]
OPENSSL = shutil.which("openssl")


def _missing(what: str) -> None:
    """Skip for a tool this machine lacks; under CI=true fail, as the other Redis tests do."""
    if IN_CI:
        pytest.fail(f"CI=true but {what}")
    pytest.skip(what)


class Server:
    """A throwaway redis-server (or, with `--sentinel` among `args`, a sentinel) on a free loopback
    port, its files in `where`; `client` is how to reach it (redis-py keywords)."""

    def __init__(self, where: Path, *args: str, tls: dict | None = None, sentinel: bool = False) -> None:
        if REDIS_BIN is None:
            _missing("redis-server binary not found")
        self.port = free_port()
        # a cluster node's bus listens 10000 ports higher: redis-server refuses a port above
        # 55535, and the bus port must be free too
        for _ in range(200):
            if "cluster-enabled yes" not in args or (self.port <= 55535 and port_free(self.port + 10000)):
                break
            self.port = free_port()
        else:
            raise RuntimeError("no free port pair (port, port + 10000) at or below 55535 for a cluster node")
        where.mkdir(parents=True, exist_ok=True)
        self.log = where / f"{self.port}.log"
        lines = ["bind 127.0.0.1", f"dir {where}", f"logfile {self.log}"]
        if not sentinel:
            lines += ["save ''", "appendonly no"]
        if tls is None:
            lines.append(f"port {self.port}")
        else:  # the tls-* lines; the client's certificate is for `client`
            lines += ["port 0", f"tls-port {self.port}"]
            lines += [f"{k} {v}" for k, v in tls.items() if k.startswith("tls-")]
        conf = where / f"{self.port}.conf"  # a sentinel rewrites its file: one of its own
        conf.write_text("\n".join([*lines, *args]) + "\n")
        cmd = [REDIS_BIN, str(conf), *(["--sentinel"] if sentinel else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = {"host": "127.0.0.1", "port": self.port, "decode_responses": True, "socket_timeout": 5}
        self.client.update(tls_client(tls))
        try:
            wait_for(self._answers, f"redis-server on {self.port}", timeout_s=20)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"redis-server did not start: {self.log.read_text()[-2000:]}") from None

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("exited")
        try:
            return redis.Redis(**self.client).ping()
        except (redis.RedisError, OSError):
            return False

    def redis(self) -> redis.Redis:
        return redis.Redis(**self.client)

    def stop(self) -> None:
        stop_process(self.proc)


def tls_client(tls: dict | None) -> dict:
    """redis-py's keywords for a client of a server started with `tls` (Server)."""
    if tls is None:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": tls["tls-ca-cert-file"],
        "ssl_certfile": tls["client-cert"],
        "ssl_keyfile": tls["client-key"],
    }


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A private CA, a server certificate it signed for 127.0.0.1 and localhost, and a client
    certificate it signed: what a managed Redis with TLS and client authentication gives out."""
    if OPENSSL is None:
        _missing("openssl not found (it makes the tests' TLS certificates)")
    d = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=r2ec test CA")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=r2ec test {name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", *extra)  # fmt: skip
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture(scope="module")
def tls(certs) -> dict[str, str]:
    """The TLS lines of a server's config (Server's `tls`), clients authenticated by certificate;
    skips where redis-server was built without TLS."""
    if REDIS_BIN is None:
        _missing("redis-server binary not found")
    # a TLS build refuses the missing certificate; one without TLS, the directive itself
    probe = [REDIS_BIN, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"]
    said = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    if "Bad directive" in said.stdout + said.stderr:
        _missing("redis-server was built without TLS (BUILD_TLS=yes): the TLS tests need one with it")
    return {
        "tls-cert-file": str(certs["server.crt"]),
        "tls-key-file": str(certs["server.key"]),
        "tls-ca-cert-file": str(certs["ca.crt"]),
        "tls-auth-clients": "yes",
        "tls-replication": "yes",
        "client-cert": str(certs["client.crt"]),
        "client-key": str(certs["client.key"]),
    }


def _tls_query(certs) -> str:
    return (
        f"ssl_ca_certs={certs['ca.crt']}&ssl_certfile={certs['client.crt']}&ssl_keyfile={certs['client.key']}"
    )


async def _every_operation(url: str) -> None:
    """What the service, retraining and `r2ec exposures export` do with Redis, once each, and
    what they read back."""
    store = RedisStore(url, window=3, timeout_s=5)
    try:
        await store.check_format("test")
        # with a user's event rate, as the route appends (its bucket, its cap on event ids)
        events = [Event("i1", 4.0, 100), Event("i2", 5.0, 200)]
        appended = await store.append_events("u1", events, rate=EventRate(10.0, 1000))
        assert appended.appended == 2
        [made] = await store.append_many([("u2", [Event("i3", 3.0, 300)])])
        assert made.appended == 1
        history = await store.get_history("u1")
        assert [e.item_id for e in history] == ["i1", "i2"]
        assert await store.get_seen("u1") == {"i1", "i2"}
        assert [e.item_id for e in await store.read_events()] == ["i1", "i2", "i3"]
        await store.cache_set("k1", "cached", "u1", [e.event_id for e in history])
        await store.cache_set("k2", "inline")
        assert (await store.cache_get("k1"), await store.cache_get("k2")) == ("cached", "inline")
        served = Served(
            "req-1", "u1", 1, "v0", "/recommend", 2, False, "", "miss", "store", ("i3",), (1.0,), (1,)
        )
        assert await store.add_served([served], maxlen=100, max_age_ms=86_400_000) == 1
        assert (await store.stream_info()).length == 3
        await store.ping()
        assert len((await store.export_user("u1")).stream) == 2
        erased = await store.erase_user("u2")
        assert (erased.history_events, erased.stream_entries) == (1, 1)
    finally:
        await store.close()
    read = read_stream_checked(url, None, None, timeout_s=5)
    assert [e.item_id for e in read.events] == ["i1", "i2"] and read.lost == 0
    assert read_erasures(url, timeout_s=5).users == {"u2"}
    assert [s.request_id for page in read_served(url, timeout_s=5) for s in page] == ["req-1"]


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tls, tmp_path_factory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("tls"), tls=tls)
    yield server
    server.stop()


async def test_tls_with_a_private_ca_and_a_client_certificate(tls_server, certs):
    """rediss:// with the CA that signed the server's certificate and the client's certificate
    as query parameters: redis-py's own, which the service passes on (they worked before, said
    nowhere; now documented and checked at start)."""
    tls_server.redis().flushall()
    await _every_operation(f"rediss://127.0.0.1:{tls_server.port}/0?{_tls_query(certs)}")


async def test_a_tls_certificate_not_trusted_stops_the_start(tls_server, certs):
    """Without the private CA the handshake cannot succeed however long the service waits: the
    start stops with what to set, where it used to start degraded and answer user requests 503
    with a WARNING every 10 s."""
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_certfile={certs['client.crt']}&ssl_keyfile={certs['client.key']}"
    store = RedisStore(url, timeout_s=5)
    try:
        with pytest.raises(StoreConfigError) as refused:
            await store.check_format("test")
    finally:
        await store.close()
    assert "TLS certificate is not trusted" in str(refused.value) and "ssl_ca_certs=" in str(refused.value)


# -- ACL ---------------------------------------------------------------------------------------


def _documented_acl() -> list[str]:
    """The `ACL SETUSER r2ec ...` line of docs/operations.md, "Managed Redis"."""
    text = (ROOT / "docs" / "operations.md").read_text()
    [line] = re.findall(r"^ACL SETUSER r2ec .*$", text, flags=re.MULTILINE)
    return line.split()


@pytest.fixture
def acl_user(redis_server, redis_url) -> Iterator[str]:
    """The docs' ACL for a user `r2ec`, its password set, on the session's redis-server."""
    admin = redis.Redis.from_url(redis_url)
    words = [w.replace(">PASSWORD", ">acl-test-pw") for w in _documented_acl()]
    assert ">acl-test-pw" in words
    admin.execute_command(*words)
    yield f"redis://r2ec:acl-test-pw@127.0.0.1:{redis_server.port}/0"
    admin.execute_command("ACL", "DELUSER", "r2ec")
    admin.close()


async def test_the_acl_docs_operations_lists_is_enough_for_everything_r2ec_does(acl_user):
    """The least the user needs (docs/operations.md, "Managed Redis"): every command the service,
    retraining and the export run, the scripts' own included, and only keys under r2ec:."""
    await _every_operation(acl_user)


async def test_the_documented_acl_takes_the_documented_client_name_parameter(acl_user):
    """docs/operations.md lists ?client_name= among the URL's parameters: redis-py then names
    each connection with CLIENT SETNAME, which the documented ACL refused, so the start stopped
    ("may not run r2ec's commands: ... 'client|setname'")."""
    await _every_operation(f"{acl_user}?client_name=r2ec-api")


async def test_a_user_whose_acl_allows_no_scripts_stops_the_start(redis_server, redis_url):
    """It used to start, say ready, and answer every event 503 ("no permissions to run the
    'evalsha' command", at most every 10 s in the log)."""
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "+@all", "-@scripting")
    store = RedisStore(f"redis://noscripts:pw@127.0.0.1:{redis_server.port}/0", timeout_s=5)
    try:
        with pytest.raises(StoreConfigError) as refused:
            await store.check_format("test")
    finally:
        await store.close()
        admin.execute_command("ACL", "DELUSER", "noscripts")
        admin.close()
    message = str(refused.value)
    assert "may not run r2ec's commands" in message and "'evalsha'" in message and "pw@" not in message


# -- Sentinel ----------------------------------------------------------------------------------


def _role(server: Server) -> str:
    return server.redis().execute_command("ROLE")[0]


def _sentinel_primary(sentinel: Server, service: str) -> int:
    return int(sentinel.redis().sentinel_get_master_addr_by_name(service)[1])


@pytest.fixture
def sentinel_pair(tmp_path) -> Iterator[tuple[Server, Server, Server]]:
    """A primary, its replica (in sync) and one sentinel monitoring them as `primary` (quorum 1:
    `SENTINEL FAILOVER` needs no other sentinel's vote)."""
    servers: list[Server] = []
    try:
        primary = Server(tmp_path / "primary")
        servers.append(primary)
        replica = Server(tmp_path / "replica", f"replicaof 127.0.0.1 {primary.port}")
        servers.append(replica)
        monitor = f"sentinel monitor primary 127.0.0.1 {primary.port} 1"
        sentinel = Server(tmp_path / "sentinel", monitor, "sentinel down-after-milliseconds primary 5000",
                          sentinel=True)  # fmt: skip
        servers.append(sentinel)
        synced = lambda: replica.redis().info("replication").get("master_link_status") == "up"  # noqa: E731
        wait_for(synced, "the replica to sync", timeout_s=60)

        def knows_replica() -> bool:
            replicas = sentinel.redis().sentinel_slaves("primary")
            return any(r["port"] == replica.port and not r["is_sdown"] for r in replicas)

        wait_for(knows_replica, "the sentinel to find the replica", timeout_s=60)
        yield primary, replica, sentinel
    finally:
        for server in servers:
            server.stop()


async def test_a_sentinel_failover_moves_the_store_to_the_new_primary(sentinel_pair):
    """Through redis+sentinel:// the store follows the primary: after a failover its writes reach
    the new one (redis-py asks the sentinel again after the demoted primary's READONLY). A URL that names
    the old primary keeps reaching it, a replica now: each write is refused, and the store says
    it is down (r2ec_store_up 0, /readyz degraded) even while reads still answer, where it used
    to say up and ready while every write failed (journey 41)."""
    primary, replica, sentinel = sentinel_pair
    followed = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/primary/0", window=5, timeout_s=5)
    pinned = RedisStore(f"redis://127.0.0.1:{primary.port}/0", window=5, timeout_s=5)
    try:
        await followed.check_format("test")
        assert (await followed.append_events("u1", [Event("before", 1.0, 1)])).appended == 1
        assert (await pinned.append_events("u2", [Event("before", 1.0, 1)])).appended == 1
        wait_for(lambda: replica.redis().llen("r2ec:history:u2") == 1, "the replica to copy the writes")

        assert sentinel.redis().execute_command("SENTINEL", "FAILOVER", "primary") in ("OK", True)
        wait_for(
            lambda: _sentinel_primary(sentinel, "primary") == replica.port, "the promotion", timeout_s=60
        )
        wait_for(lambda: _role(primary) == "slave", "the old primary's demotion", timeout_s=60)

        # the connection the store held to the demoted primary may fail its next command (redis-py
        # reconnects it to the address it had: redis/redis-py#3874); the pool's next one asks the
        # sentinel, so the write after that reaches the new primary
        try:
            await followed.append_events("u1", [Event("after", 1.0, 2)])
        except StoreUnavailable as exc:
            assert "previous master is now a slave" in str(exc) or "Connection closed" in str(exc), exc
            assert (await followed.append_events("u1", [Event("after", 1.0, 2)])).appended == 1
        assert [e.item_id for e in await followed.get_history("u1")] == ["before", "after"]
        assert replica.redis().llen("r2ec:history:u1") == 2  # on the new primary
        assert followed.up
        read = read_stream_checked(f"redis+sentinel://127.0.0.1:{sentinel.port}/primary/0", timeout_s=5)
        assert [e.item_id for e in read.events] == ["before", "before", "after"]

        with pytest.raises(StoreUnavailable) as refused:
            await pinned.append_events("u2", [Event("after", 1.0, 2)])
        assert "READONLY: this node is a replica" in str(refused.value)
        assert not pinned.up
        assert [e.item_id for e in await pinned.get_history("u2")] == ["before"]  # reads answer...
        assert not pinned.up  # ...and the store is still down: writes are what it is for
        with pytest.raises(StoreUnavailable):
            await pinned.ping()  # the readiness probe writes, so /readyz says degraded too
    finally:
        await followed.close()
        await pinned.close()


async def test_a_write_a_replica_refuses_is_tried_once_more_on_a_new_connection(tmp_path):
    """docs/operations.md, "Failover", through one endpoint: a READONLY drops the connection and
    the command is tried once more on a new one (service/redis_conn.py `_retry`), where a primary
    endpoint would reach the new primary; a replica wrote nothing for either try."""
    primary = Server(tmp_path / "primary")
    try:
        replica = Server(tmp_path / "replica", f"replicaof 127.0.0.1 {primary.port}")
        try:
            synced = lambda: replica.redis().info("replication").get("master_link_status") == "up"  # noqa: E731
            wait_for(synced, "the replica to sync", timeout_s=60)
            store = RedisStore(f"redis://127.0.0.1:{replica.port}/0", timeout_s=5)
            try:
                await store.get_history("u1")  # a connection in the pool, as a serving replica has
                admin = replica.redis()
                admin.config_resetstat()  # its counts from here: admin's and the store's connections made
                with pytest.raises(StoreUnavailable) as refused:
                    await store.append_events("u1", [Event("i1", 1.0, 1)])
                assert "READONLY" in str(refused.value) and not store.up
                assert admin.info("errorstats")["errorstat_READONLY"]["count"] == 2  # try, retry
                assert admin.info("stats")["total_connections_received"] == 1  # the retry's, new
                assert admin.dbsize() == 0
            finally:
                await store.close()
        finally:
            replica.stop()
    finally:
        primary.stop()


async def test_a_sentinel_url_naming_no_monitored_service_stops_the_start(sentinel_pair):
    _, _, sentinel = sentinel_pair
    store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/primray/0", timeout_s=5)
    try:
        with pytest.raises(StoreConfigError) as refused:
            await store.check_format("test")
    finally:
        await store.close()
    assert "names the service 'primray', which the sentinels that answered do not monitor" in str(
        refused.value
    )
    assert "(they monitor: primary)" in str(refused.value)


@pytest.mark.parametrize("given", ["", "?sentinel_password=wrong-pw"])
async def test_sentinels_that_refuse_the_url_credentials_stop_the_start(sentinel_pair, given):
    """Sentinels that ask for a password (their own `requirepass`) refusing the URL's
    sentinel_password, or its absence, can no more be waited out than a data node refusing its
    password: the start stops naming sentinel_password, where it used to start degraded and
    answer every request 503 ("No master found for 'primary' : ... AuthenticationError")."""
    _, _, sentinel = sentinel_pair
    admin = sentinel.redis()
    admin.execute_command("ACL", "SETUSER", "default", "resetpass", ">sentinel-test-pw")
    try:
        store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/primary/0{given}", timeout_s=5)
        try:
            with pytest.raises(StoreConfigError) as refused:
                await store.check_format("test")
        finally:
            await store.close()
        message = str(refused.value)
        assert "sentinel_password" in message and "wrong-pw" not in message
        right = f"redis+sentinel://127.0.0.1:{sentinel.port}/primary/0?sentinel_password=sentinel-test-pw"
        store = RedisStore(right, timeout_s=5)
        try:
            await store.check_format("test")  # the right one goes through
        finally:
            await store.close()
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "nopass")
        admin.close()


async def test_a_sentinel_named_as_a_redis_stops_the_start(sentinel_pair):
    """redis://SENTINEL:26379 (a common slip) used to start and answer 503 to everything."""
    _, _, sentinel = sentinel_pair
    store = RedisStore(f"redis://127.0.0.1:{sentinel.port}/0", timeout_s=5)
    try:
        with pytest.raises(StoreConfigError) as refused:
            await store.check_format("test")
    finally:
        await store.close()
    assert "a Redis Sentinel? Name the sentinels" in str(refused.value)


async def test_sentinel_and_data_nodes_over_tls(tls, certs, tmp_path):
    """rediss+sentinel://: TLS to the sentinel and to the primary it names, both with the URL's
    CA and client certificate."""
    primary = Server(tmp_path / "primary", tls=tls)
    try:
        monitor = f"sentinel monitor tlsprimary 127.0.0.1 {primary.port} 1"
        sentinel = Server(tmp_path / "sentinel", monitor, tls=tls, sentinel=True)
        try:
            await _every_operation(
                f"rediss+sentinel://127.0.0.1:{sentinel.port}/tlsprimary/0?{_tls_query(certs)}"
            )
        finally:
            sentinel.stop()
    finally:
        primary.stop()


# -- Cluster -----------------------------------------------------------------------------------


async def test_a_redis_cluster_is_refused_at_the_start_saying_why(tmp_path):
    """A cluster runs a script only over keys of one hash slot, and every append writes the user's
    keys with the one event stream. It used to start and answer most requests 503 ("6622
    127.0.0.1:7431", a MOVED), some users' reads working; now the start stops with CLUSTER_REFUSAL
    (docs/operations.md, "Managed Redis", says why r2ec does not hash-tag its keys instead). One
    node holding every slot is enough: the scripts' keys still fall in different slots."""
    assert len({redis.crc.key_slot(k.encode()) for k in _INFO_KEYS}) > 1  # the start's probe
    node = Server(tmp_path, "cluster-enabled yes", f"cluster-config-file {tmp_path}/nodes.conf")
    try:
        node.redis().cluster("addslotsrange", 0, 16383)
        wait_for(lambda: node.redis().cluster("info")["cluster_state"] == "ok", "the cluster")
        store = RedisStore(f"redis://127.0.0.1:{node.port}/0", timeout_s=5)
        try:
            with pytest.raises(StoreConfigError) as refused:
                await store.check_format("test")
            assert CLUSTER_REFUSAL in str(refused.value)
            with pytest.raises(StoreUnavailable) as failed:  # and an operation says the same
                await store.append_events("u1", [Event("i1", 1.0, 1)])
            assert CLUSTER_REFUSAL in str(failed.value) and not store.up
        finally:
            await store.close()
    finally:
        node.stop()


async def test_a_redis_that_takes_no_writes_for_want_of_replicas_reads_as_down(tmp_path):
    """min-replicas-to-write (docs/operations.md, "Failover") with no replica in sync: every write
    is refused NOREPLICAS while reads answer. The store reads as down, as for a replica's
    READONLY (r2ec_store_up 0, so R2ecStoreDown fires), until a write goes through again."""
    server = Server(tmp_path / "alone", "min-replicas-to-write 1")
    try:
        store = RedisStore(f"redis://127.0.0.1:{server.port}/0", timeout_s=5)
        try:
            assert await store.get_history("u1") == [] and store.up
            with pytest.raises(StoreUnavailable) as refused:
                await store.append_events("u1", [Event("i1", 1.0, 1)])
            assert "NOREPLICAS" in str(refused.value) and not store.up
            await store.get_history("u1")  # a read answers: still down, writes still fail
            assert not store.up
            with pytest.raises(StoreUnavailable):
                await store.ping()
            server.redis().config_set("min-replicas-to-write", 0)
            await store.ping()  # the readiness probe's write goes through
            assert store.up
            await store.append_events("u1", [Event("i1", 1.0, 1)])
            assert [e.item_id for e in await store.get_history("u1")] == ["i1"]
        finally:
            await store.close()
    finally:
        server.stop()
