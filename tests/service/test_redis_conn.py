"""R2EC_REDIS_URL as service/redis_conn.py reads it, without a server: what a URL may set, what
it refuses at start and how, and that no refusal shows the password (journey 41). The same URLs
against real redis-servers (TLS, Sentinel, a cluster, an ACL): tests/service/test_redis_managed.py."""

from __future__ import annotations

import inspect

import pytest
import redis.asyncio.connection
import redis.connection
from pydantic import ValidationError

from service.config import Settings
from service.redis_conn import PARAMS, TLS_PARAMS, RedisUrlError, parse, redact


@pytest.mark.parametrize(
    "url",
    [
        # '/' and '#': redis-py read s3cr3t as the port, and said so in its error
        "rediss://r2ec:s3cr3t/pwpw#xyzw@cache.example:6380/0",
        "redis://r2ec:abcd?efgh@cache.example/0",
        "redis://:topp#secret@cache.example/0",
        "redis://r2ec:1234/abcd@cache.example:6379/0",  # which redis-py read as host r2ec, port 1234
        "redis+sentinel://r2ec:s3cr3t/pwpw@s1:26379/mymaster",
    ],
)
def test_an_unencoded_password_is_refused_naming_the_fix_and_not_the_password(url):
    with pytest.raises(RedisUrlError) as caught:
        parse(url)
    message = str(caught.value)
    assert "percent-encode" in message and "urllib.parse.quote" in message
    secret = url.split("://")[1].rsplit("@", 1)[0].split(":", 1)[1]
    for piece in {secret, *secret.replace("?", "/").replace("#", "/").split("/")}:
        assert piece not in message
    with pytest.raises(ValidationError) as refused:  # how `r2ec serve` says it: no input echoed
        Settings(redis_url=url)
    assert "percent-encode" in str(refused.value) and secret.split("/")[0] not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (
            "rediss://h/0?ssl_ca_cert=/etc/ca.pem",
            "unknown parameter 'ssl_ca_cert' (did you mean ssl_ca_certs?)",
        ),
        (
            "redis://h/0?ssl_ca_certs={ca}",
            "ssl_ca_certs, a TLS setting, under redis://, which does not speak",
        ),
        ("redis+sentinel://s1/m?ssl_ca_certs={ca}", "start it with rediss+sentinel://"),
        (
            "rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem",
            "ssl_ca_certs names '/nonexistent/ca.pem', which does not",
        ),
        ("rediss://h/0?ssl_certfile={dir}", "ssl_certfile names '{dir}', which is not a file"),
        ("rediss://h/0?ssl_ca_path={ca}", "ssl_ca_path names '{ca}', which is not a directory"),
        ("rediss://h/0?ssl_cert_reqs=no", "ssl_cert_reqs must be one of none, optional, required, got 'no'"),
        ("redis://h/0?socket_timeout=soon", "Invalid value for 'socket_timeout' in connection URL."),
        ("redis://h/0?sentinel_password=x", "sentinel_password, which only a redis+sentinel:// URL reads"),
        ("redis://h/0?protocol=3", "unknown parameter 'protocol'"),
        ("http://h:6379/0", "must start with one of redis://, rediss://, unix://, redis+sentinel://"),
        ("redis+sentinel://s1:26379", "ends in /SERVICE or /SERVICE/DB"),
        ("redis+sentinel://s1:26379/m/0/1", "ends in /SERVICE or /SERVICE/DB"),
        ("redis+sentinel://s1:port/m", "sentinel address 's1:port' is not host[:port]"),
        ("redis://h:63a79/0", "a host or port it cannot read"),
    ],
)
def test_a_url_that_cannot_work_is_refused_at_start_naming_what_is_wrong(tmp_path, url, said):
    """Each used to pass Settings and fail at the first request: a TypeError from redis-py's
    connection (a 500, and a traceback at the start's format check) for a parameter it does not
    take, 'Error 2 connecting to host:port. No such file or directory.' for a missing CA file."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    url = url.format(ca=ca, dir=tmp_path)
    with pytest.raises(RedisUrlError) as caught:
        parse(url)
    assert said.format(ca=ca, dir=tmp_path) in str(caught.value)
    with pytest.raises(ValidationError) as refused:
        Settings(redis_url=url)
    assert said.format(ca=ca, dir=tmp_path) in str(refused.value)


def test_a_tls_url_with_a_private_ca_and_a_client_certificate_gives_redis_py_its_files(tmp_path):
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("read by the TLS handshake, not here")
    url = (
        f"rediss://app:p%40ss@cache.example:6380/2?ssl_ca_certs={tmp_path}/ca.pem"
        f"&ssl_certfile={tmp_path}/client.pem&ssl_keyfile={tmp_path}/client.key&ssl_check_hostname=false"
    )
    target = parse(url)
    assert target.tls and not target.sentinels
    assert {k: target.options[k] for k in ("host", "port", "db", "username", "password")} == {
        "host": "cache.example",
        "port": 6380,
        "db": 2,
        "username": "app",
        "password": "p@ss",
    }
    assert target.options["ssl_ca_certs"] == f"{tmp_path}/ca.pem"
    assert target.options["ssl_check_hostname"] is False
    assert "p%40ss" not in target.shown and "p@ss" not in target.shown and "p@ss" not in repr(target)
    assert Settings(redis_url=url).redis_url == url  # Settings keeps what it was given


def test_a_sentinel_url_names_the_sentinels_the_service_and_both_sides_credentials(tmp_path):
    (tmp_path / "ca.pem").write_text("")
    url = (
        f"rediss+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/my%20primary/3?ssl_ca_certs={tmp_path}/ca.pem"
        "&sentinel_username=watch&sentinel_password=sentinelpw&socket_timeout=2"
    )
    target = parse(url)
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert target.service == "my primary"
    # the data nodes: the URL's user and password, db, TLS (redis-py's Sentinel-managed TLS connection)
    assert dict(target.options) == {
        "username": "app",
        "password": "p@ss",
        "db": 3,
        "ssl": True,
        "ssl_ca_certs": f"{tmp_path}/ca.pem",
        "socket_timeout": 2.0,
    }
    # the sentinels: their own user and password, the same TLS
    assert dict(target.sentinel_options) == {
        "ssl": True,
        "ssl_ca_certs": f"{tmp_path}/ca.pem",
        "username": "watch",
        "password": "sentinelpw",
    }
    shown = redact(url)
    assert "sentinelpw" not in shown and "p%40ss" not in shown and "watch" not in shown
    assert shown.startswith("rediss+sentinel://app:***@s1:26380,s2,[::1]:5000/my%20primary/3?")


def test_a_sentinel_url_without_tls_or_credentials_reads_as_plainly():
    target = parse("redis+sentinel://10.0.0.1,10.0.0.2/mymaster")
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert target.service == "mymaster"
    assert (dict(target.options), dict(target.sentinel_options)) == ({"db": 0}, {})


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "redis://h", "unix:///run/redis.sock?db=2"])
def test_plain_urls_read_as_redis_py_reads_them(url):
    assert dict(parse(url).options) == redis.connection.parse_url(url)


def test_every_parameter_a_url_may_set_is_one_both_redis_py_clients_take():
    """PARAMS and TLS_PARAMS (service/redis_conn.py) against redis-py's signatures: the service's
    asyncio client and the batch jobs' sync one must both take each, or a URL that passed the
    check would fail at the first connection of one of them."""

    def names(*functions) -> set[str]:
        return {p for f in functions for p in inspect.signature(f).parameters}

    for module in (redis.connection, redis.asyncio.connection):
        pool, connection = module.ConnectionPool, module.Connection
        plain = names(pool.__init__, module.AbstractConnection.__init__, connection.__init__)
        tls = plain | names(module.SSLConnection.__init__)
        assert PARAMS <= plain, (module.__name__, PARAMS - plain)
        assert TLS_PARAMS <= tls, (module.__name__, TLS_PARAMS - tls)


@pytest.mark.parametrize(
    ("url", "secret", "said"),
    [
        # a password with an unencoded '&' (ElastiCache's tokens may hold one) in ?password=:
        # the rest of it reads as a parameter of its own
        ("redis://h/0?password=Ab3&x9Kq$z", "x9Kq", "after 'password'"),
        ("redis+sentinel://s1/m?sentinel_password=ab&Qz7w=ef", "Qz7w", "after 'sentinel_password'"),
        # a misspelt secret parameter: its value is the secret
        ("redis://h/0?pasword=TOPSECRET", "TOPSECRET", "parameter 'pasword' (did you mean password?)"),
        ("rediss://h/0?ssl_pasword=KEYPASS", "KEYPASS", "(did you mean ssl_password?)"),
    ],
)
def test_a_refused_query_parameter_does_not_show_a_password(url, secret, said):
    """The unknown-parameter refusal named the parameter and showed the URL with only the
    parameters it knew as secret masked: the tail of a password after an unencoded '&', or the
    whole password under a misspelt name, went to the start's one line (and Settings' error)."""
    with pytest.raises(RedisUrlError) as caught:
        parse(url)
    assert said in str(caught.value)
    assert secret not in str(caught.value)
    assert secret not in redact(url)
    with pytest.raises(ValidationError) as refused:
        Settings(redis_url=url)
    assert secret not in str(refused.value)
