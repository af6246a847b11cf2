"""R2EC_REDIS_URL: read, checked, and made into redis-py clients.

Every Redis client of the service and of the `r2ec` commands is made here (service/store.py: the
service's store, retraining's reads of the stream and the ledger, `r2ec user`, `r2ec exposures
export`), so each takes the same URLs (docs/operations.md, "Managed Redis"):

- `redis://[user:password@]host[:port][/db][?params]`: one Redis, or a managed service's primary
  endpoint (a DNS name that moves to the new primary at a failover).
- `rediss://...`: the same over TLS. `ssl_ca_certs=/path/ca.pem` trusts a private CA;
  `ssl_certfile=` and `ssl_keyfile=` present a client certificate.
- `unix:///path/redis.sock[?db=N]`: a local socket.
- `redis+sentinel://[user:password@]sentinel[:port][,sentinel[:port]...]/service[/db][?params]`:
  the primary that Redis Sentinel names for `service` (port 26379 where none is given);
  `rediss+sentinel://` speaks TLS to the sentinels and to the data nodes alike. The URL's user and
  password are the data nodes'; `sentinel_username=` and `sentinel_password=` are the sentinels'
  own, where they ask for one. The same format as the redis-sentinel-url package and others.

The query parameters are redis-py's keyword arguments for a connection, as its own `from_url`
reads them; PARAMS lists those a URL may set here (each a string, a number or a flag, and one
both the sync and the asyncio client take), so a misspelt one, or a TLS one under `redis://`, is
an error at start that names it, not a TypeError at the first request.

A failover. Through Sentinel, redis-py's SentinelManagedConnection turns the READONLY of a demoted
primary into a ConnectionError and drops the connection; the next operation takes a connection
from the pool, which asks the sentinels for the primary. The operation that met the demoted
primary fails (at most one a connection the pool held to it): redis-py reconnects a connection
within a command to the address it had (redis/redis-py#3874), so a retry there would only meet
the old primary again. Through one URL, a READONLY reply drops the connection and the command is
tried once more on a new one (`_retry`), the host name resolved again: a managed service's
primary endpoint then reaches the new primary; a URL that names one node keeps reaching it, a
replica now, and the store reports itself down (service/store.py). Nothing else is tried twice:
a Redis that stalls costs a request one timeout, not two.

Nothing here puts a password in an exception's text: `redact` masks the URL wherever it is shown.
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ReadOnlyError

SENTINEL_PORT = 26379
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
TLS_SCHEMES = frozenset({"rediss", "rediss+sentinel"})

# The query parameters a URL may set (redis-py's connection keywords): values a URL can carry,
# taken alike by redis.Redis and redis.asyncio.Redis (tests/service/test_redis_conn.py checks
# redis-py's signatures still take each). Left out: objects (retry, credential_provider,
# parser_class), protocol (RESP3 replies the scripts' callers do not parse), the sync client's
# OCSP options (the service's asyncio client has none).
PARAMS = frozenset(
    {
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "max_connections",
        "client_name",
        "retry_on_timeout",
    }
)
TLS_PARAMS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_ca_data",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_ciphers",
    }
)
SENTINEL_PARAMS = frozenset({"sentinel_username", "sentinel_password"})
# parameters that name a file (or, ssl_ca_path, a directory) the client reads at each connection
TLS_FILES = {
    "ssl_ca_certs": "file",
    "ssl_certfile": "file",
    "ssl_keyfile": "file",
    "ssl_ca_path": "directory",
}
CERT_REQS = ("none", "optional", "required")
# query parameters whose value is a secret (`redact`)
SECRET_PARAMS = frozenset({"password", "username", "ssl_password", "sentinel_password", "sentinel_username"})
KNOWN_PARAMS = PARAMS | TLS_PARAMS | SENTINEL_PARAMS


class RedisUrlError(ValueError):
    """R2EC_REDIS_URL cannot be used; the message names what is wrong, never the password."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed R2EC_REDIS_URL (`parse`). `options`: redis-py's connection keywords from it
    (credentials, db, TLS); for a Sentinel URL `sentinels` and `service` name the primary, and
    `sentinel_options` are the keywords for connecting to the sentinels."""

    url: str = field(repr=False)
    scheme: str
    options: Mapping[str, Any] = field(repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme in TLS_SCHEMES

    @property
    def shown(self) -> str:
        """The URL as logs may show it (`redact`)."""
        return redact(self.url)


def parse(url: str) -> RedisTarget:
    """`url` read and checked (module docstring); RedisUrlError naming what is wrong."""
    shown = redact(url)
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise RedisUrlError(
            f"R2EC_REDIS_URL must start with one of {', '.join(s + '://' for s in SCHEMES)}; got {shown!r}"
        )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise RedisUrlError(f"R2EC_REDIS_URL is not a URL ({shown})") from None
    if "@" in parts.path + parts.query + parts.fragment or parts.fragment:
        # a password's unencoded '/', '?' or '#' ends the host part early: redis-py would read a
        # piece of the password as the host or the port, and say so in every error
        raise RedisUrlError(
            f"R2EC_REDIS_URL has a '/', '?', '#' or '@' where its user or password should be "
            f"({shown}): percent-encode them in the password, e.g. with python3 -c "
            "\"import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=''))\" PASSWORD"
        )
    _check_secret_tails(parts.query, shown)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    _check_params(scheme, query, shown)
    if scheme.endswith("+sentinel"):
        return _parse_sentinel(url, scheme, parts, query, shown)
    return RedisTarget(url, scheme, _redis_py_options(url, shown))


def _check_secret_tails(query: str, shown: str) -> None:
    """RedisUrlError, naming no part of it, where a parameter this module does not know follows
    a secret one: most likely the rest of a password that held an unencoded '&'."""
    after = ""
    for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if after and name not in KNOWN_PARAMS:
            raise RedisUrlError(
                f"R2EC_REDIS_URL has a parameter it does not know after {after!r}: an unencoded '&' "
                f"in the {after} (percent-encode it, %26), or a misspelt parameter? ({shown})"
            )
        after = name if name.lower() in SECRET_PARAMS else ("" if name in KNOWN_PARAMS else after)


def _check_params(scheme: str, query: Mapping[str, list[str]], shown: str) -> None:
    known = KNOWN_PARAMS
    for name, values in query.items():
        if name not in known:
            # the name only: its value may be a secret (`redact` masks it), ?pasword=...
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; it takes {', '.join(sorted(known))}"
            raise RedisUrlError(f"R2EC_REDIS_URL has an unknown parameter {name!r}{hint} ({shown})")
        if name in TLS_PARAMS and scheme not in TLS_SCHEMES:
            tls = scheme.replace("redis", "rediss", 1)
            raise RedisUrlError(
                f"R2EC_REDIS_URL sets {name}, a TLS setting, under {scheme}://, which does not "
                f"speak TLS: start it with {tls}:// ({shown})"
            )
        if name in SENTINEL_PARAMS and not scheme.endswith("+sentinel"):
            raise RedisUrlError(
                f"R2EC_REDIS_URL sets {name}, which only a redis+sentinel:// URL reads ({shown})"
            )
        value = values[-1]
        if name == "ssl_cert_reqs" and value not in CERT_REQS:
            raise RedisUrlError(
                f"R2EC_REDIS_URL: ssl_cert_reqs must be one of {', '.join(CERT_REQS)}, got {value!r}"
            )
        if name in TLS_FILES:
            kind = TLS_FILES[name]
            if not os.path.exists(value):
                why = "does not exist"
            elif not (os.path.isdir(value) if kind == "directory" else os.path.isfile(value)):
                why = f"is not a {kind}"
            elif not os.access(value, os.R_OK):
                why = "this process may not read"
            else:
                continue
            raise RedisUrlError(f"R2EC_REDIS_URL: {name} names {value!r}, which {why}")


def _redis_py_options(url: str, shown: str) -> dict[str, Any]:
    """redis-py's own reading of a redis://, rediss:// or unix:// URL, its errors without the URL."""
    try:
        return parse_url(url)
    except ValueError as exc:
        # redis-py's words where they name a parameter; not where they quote the host part
        why = str(exc) if str(exc).startswith("Invalid value for") else "a host or port it cannot read"
        raise RedisUrlError(f"R2EC_REDIS_URL: {why} ({shown})") from None


def _parse_sentinel(
    url: str, scheme: str, parts: urllib.parse.SplitResult, query: Mapping[str, list[str]], shown: str
) -> RedisTarget:
    userinfo, at, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for address in hosts.split(","):
        try:
            where = urllib.parse.urlsplit(f"//{address}")
            port = where.port or SENTINEL_PORT
        except ValueError:
            where, port = None, 0
        if where is None or not where.hostname:
            raise RedisUrlError(f"R2EC_REDIS_URL: sentinel address {address!r} is not host[:port] ({shown})")
        sentinels.append((where.hostname, port))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise RedisUrlError(
            f"R2EC_REDIS_URL: a {scheme}:// URL ends in /SERVICE or /SERVICE/DB, the name Sentinel "
            f"monitors the primary under (its `sentinel monitor` line) and the db number ({shown})"
        )
    service, db = urllib.parse.unquote(path[0]), (path[1] if len(path) == 2 else "0")
    data_query = urllib.parse.urlencode(
        [(k, v[-1]) for k, v in query.items() if k not in SENTINEL_PARAMS], safe="/"
    )
    # the data nodes' URL: redis-py reads its credentials, db and TLS settings as from_url would;
    # the host is a placeholder, Sentinel names the primary at each connection
    data_url = f"{scheme.removesuffix('+sentinel')}://{userinfo}{at}placeholder/{db}"
    options = _redis_py_options(data_url + (f"?{data_query}" if data_query else ""), shown)
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    tls = scheme in TLS_SCHEMES
    # the sentinels: the same TLS, their own credentials (none unless given)
    sentinel_options: dict[str, Any] = {k: v for k, v in options.items() if k in TLS_PARAMS}
    if tls:
        options["ssl"] = True  # redis-py's SentinelManagedSSLConnection
        sentinel_options["ssl"] = True
    for name in SENTINEL_PARAMS:
        if name in query:
            sentinel_options[name.removeprefix("sentinel_")] = query[name][-1]
    return RedisTarget(url, scheme, options, tuple(sentinels), service, sentinel_options)


def _client_options(timeout_s: float) -> dict[str, Any]:
    return {"decode_responses": True, "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}


def _retry(retry_class: type) -> redis.retry.Retry:
    """For one URL: after a READONLY (a failover: module docstring), one more try, at once, on
    a new connection. redis-py's own default for a client made from a URL tries nothing twice."""
    return retry_class(NoBackoff(), 1, supported_errors=(ReadOnlyError,))


def _sentinel_options(target: RedisTarget, timeout_s: float) -> dict[str, Any]:
    return {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, **target.sentinel_options}


class AsyncRedis:
    """The service's asyncio client (`client`) and, for a Sentinel URL, the sentinels' clients
    it asks for the primary: `aclose` closes both."""

    def __init__(self, url: str, timeout_s: float) -> None:
        target = parse(url)
        self.target = target
        self.sentinel: redis.asyncio.sentinel.Sentinel | None = None
        if not target.sentinels:
            # the URL's own parameters win over these, as in redis-py's from_url
            retry = _retry(redis.asyncio.retry.Retry)
            self.client: redis.asyncio.Redis = redis.asyncio.from_url(
                url, retry=retry, **_client_options(timeout_s)
            )
            return
        self.sentinel = redis.asyncio.sentinel.Sentinel(
            target.sentinels, sentinel_kwargs=_sentinel_options(target, timeout_s)
        )
        options = {**_client_options(timeout_s), **target.options}
        self.client = self.sentinel.master_for(target.service, redis_class=redis.asyncio.Redis, **options)

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            if self.sentinel is not None:
                for sentinel in self.sentinel.sentinels:
                    await sentinel.aclose()


class SyncRedis:
    """A synchronous client for a batch job (retraining's reads, `r2ec exposures export`) and,
    for a Sentinel URL, the sentinels' clients: `close` closes both."""

    def __init__(self, url: str, timeout_s: float) -> None:
        target = parse(url)
        self.target = target
        self.sentinel: redis.sentinel.Sentinel | None = None
        if not target.sentinels:
            retry = _retry(redis.retry.Retry)
            self.client: redis.Redis = redis.Redis.from_url(url, retry=retry, **_client_options(timeout_s))
            return
        self.sentinel = redis.sentinel.Sentinel(
            target.sentinels, sentinel_kwargs=_sentinel_options(target, timeout_s)
        )
        options = {**_client_options(timeout_s), **target.options}
        self.client = self.sentinel.master_for(target.service, redis_class=redis.Redis, **options)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            for node in self.sentinel.sentinels if self.sentinel is not None else ():
                node.close()


def redact(url: str) -> str:
    """The URL with its credentials masked, for the log: the userinfo's password
    (redis://user:secret@host -> redis://user:***@host; a lone userinfo, which may be a
    password, whole) and the query parameters redis-py reads a secret from
    (redis://host/0?password=secret -> redis://host/0?password=***); the value of a parameter
    it does not know (a misspelt ?pasword=secret), and its name too after a secret one (the rest
    of a password that held an unencoded '&'); the other parameters kept.
    The userinfo is everything before the LAST "@", not what a URL parser reads: a password may
    hold an unencoded "/", "?" or "#" (base64 ones do), which end a parser's host part early and
    would leave it whole. Nothing of it goes to clients (service/errors.py, ServiceState.readiness)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        rest = (f"{user}:***@" if has_password else "***@") + rest
    where, question, query = rest.partition("?")
    if query:
        masked, after_secret = [], False
        for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if k.lower() in SECRET_PARAMS:
                masked.append((k, "***"))
                after_secret = True
            elif k in KNOWN_PARAMS:
                masked.append((k, v))
                after_secret = False
            else:
                # one this module does not know: a misspelt name, whose value may be a secret
                # (?pasword=...), or, after a secret one (or such a name), the rest of a secret
                # that held an unencoded '&', its name a piece of it too
                masked.append(("***" if after_secret else k, "***"))
                after_secret = True
        query = urllib.parse.urlencode(masked, safe="*/")
    return (f"{scheme}://" if sep else "") + where + (f"?{query}" if query else "")
