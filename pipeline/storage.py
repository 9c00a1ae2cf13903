"""fsspec access for local paths, s3:// and any other fsspec URL, with credentials kept out of sight.

Storage options are keyed by location, so that each location gets its own and nothing from one
protocol ever reaches another (an s3 `key` handed to aiohttp kills an https input)::

    {"s3": {"endpoint_url": "http://127.0.0.1:9000"},         # every s3:// URL
     "s3://public-bucket/": {"anon": True},                    # merged over "s3" for that prefix
     "https": {"headers": {"Authorization": "Bearer ..."}}}    # http:// has its own key

A prefix matches at a `/` boundary (`s3://b/data/` covers `s3://b/data/x.mp4`, not `s3://b/data2/`);
local prefixes are written `file:///abs/dir/`.

`normalize_options` validates that form (and converts the legacy flat form, which meant s3 only);
`options_for` picks one URL's options; `filesystem` builds the filesystem with them.
`canonical_uri` is the identity of an object however it was spelled (frame ids, the `source` column).
`redact`, `redact_url` and `redact_text` are what the project calls before anything is printed,
logged or written. `translate_error` turns s3fs/botocore failures into plain built-in exceptions.

fpn never creates a bucket: s3fs's `makedirs`/`mkdir` CREATE a bucket when given a bare bucket
name, so nothing in the project may call them on object storage (`pipeline.output.check_output_location` is
the check to make instead; writing an object needs no directory).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import email.utils
import inspect
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from functools import lru_cache
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

__all__ = [
    "filesystem", "join", "parquet_files", "options_for", "normalize_options", "merge_options",
    "canonical_uri", "redact", "redact_url", "redact_text", "drop_redacted", "translate_error",
    "check_endpoint", "local_copy", "ranged_opener", "open_ranged", "REMOTE_BLOCK",
    "protocol_of", "object_version", "object_mtime", "exception_chain", "first_line", "one_line", "REDACTED",
]

log = logging.getLogger(__name__)

REDACTED = "***"

# ---------------------------------------------------------------------------------------------
# storage options per location

# Spellings of one protocol that share one options entry (a URL's own scheme is kept otherwise:
# http and https are separate keys).
_ALIASES = {"s3a": "s3", "s3n": "s3", "local": "file", "gs": "gcs", "abfss": "abfs"}

# Options every fsspec filesystem accepts through `**kwargs`: the listings cache (fsspec DirCache)
# and the instance cache switch (consumed by fsspec's metaclass).
_COMMON_EXTRAS = frozenset({"use_listings_cache", "listings_expiry_time", "skip_instance_cache"})

# Options accepted beyond the named parameters of the filesystem's `__init__`, per protocol.
# s3: s3fs passes `max_paths` to the listings cache and every other keyword to
#     `aiobotocore.session.AioSession`, whose only user-facing one is `profile`.
# http(s): fsspec's HTTPFileSystem passes every other keyword to each aiohttp request
#     (`session.get(url, **kwargs)`); only request arguments that work with plain YAML values are
#     listed (not `auth`/`timeout`, which need aiohttp objects: put credentials in `headers`).
#     HTTPFileSystem pops `use_listings_cache`/`listings_expiry_time`; `max_paths` would reach aiohttp.
_HTTP_EXTRAS = frozenset({"headers", "params", "cookies", "proxy", "ssl", "allow_redirects", "max_redirects",
                          "use_listings_cache", "listings_expiry_time", "skip_instance_cache"})
_EXTRAS = {
    "s3": _COMMON_EXTRAS | {"max_paths", "profile"},
    "http": _HTTP_EXTRAS,
    "https": _HTTP_EXTRAS,
}
# Protocols whose extra keywords do NOT go up the class hierarchy (so walking the MRO would be wrong).
_NO_MRO_WALK = {"s3", "http", "https"}
# Parameters that take runtime objects (event loop, client factories, sessions), never configuration.
_NOT_OPTIONS = frozenset({"self", "asynchronous", "loop", "get_client", "session"})


def protocol_of(url: str) -> str:
    """The options key of a URL's protocol: its scheme lower-cased (aliases folded), `file` for paths."""
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    return _ALIASES.get(scheme, scheme)


def _is_protocol_name(name: str) -> bool:
    from fsspec.registry import known_implementations, registry

    name = _ALIASES.get(name.lower(), name.lower())
    return name in known_implementations or name in registry


@lru_cache(maxsize=None)
def _known_options(proto: str) -> frozenset[str]:
    """Option names the filesystem of `proto` takes: the named parameters of its `__init__` (walking
    up the classes while `**kwargs` is forwarded) plus the documented extras in `_EXTRAS`.
    Raises ValueError when the filesystem's package is not installed."""
    try:
        cls = fsspec.get_filesystem_class(proto)
    except ImportError as e:
        raise ValueError(f"the filesystem package for {proto} is not installed ({e})") from None
    except ValueError:
        raise ValueError("unknown protocol") from None
    names: set[str] = set()
    for klass in cls.__mro__ if proto not in _NO_MRO_WALK else (cls,):
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names - _NOT_OPTIONS) | _EXTRAS.get(proto, _COMMON_EXTRAS)


def _check_location(field: str, proto: str, opts: Any) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise ValueError(f"{field}: expected a mapping of options, got {type(opts).__name__}")
    try:
        known = _known_options(proto)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    for name in opts:
        if name not in known:
            raise ValueError(f"{field}.{name}: not an option of the {proto} filesystem (known: {', '.join(sorted(known))})")
    return dict(opts)


def _prefix_key(prefix: str) -> str:
    """A URL prefix with its scheme lower-cased and aliases folded (`s3a://b/` -> `s3://b/`)."""
    scheme, rest = prefix.split("://", 1)
    return f"{protocol_of(prefix)}://{rest}" if scheme else prefix


def _is_location_key(key: Any) -> bool:
    return isinstance(key, str) and ("://" in key or _is_protocol_name(key))


def normalize_options(raw: dict[str, Any] | None, *, field: str = "storage_options") -> dict[str, dict[str, Any]]:
    """Validate storage options and return the nested form `{protocol or URL prefix: {option: value}}`.

    A flat dict (no key is a protocol or a URL prefix: `{"endpoint_url": ..., "key": ...}`, as old specs
    and old `_job.json` records hold) means options for `s3` only. Raises ValueError naming the field path
    and the problem (`storage_options.https.key: not an option of the https filesystem (known: ...)`).
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{field}: expected a mapping, got {type(raw).__name__}")
    if not any(_is_location_key(k) for k in raw):
        for name, value in raw.items():
            if isinstance(value, dict) and name not in _known_options("s3"):
                raise ValueError(f"{field}.{name}: unknown protocol")
        return {"s3": _check_location(field, "s3", raw)} if raw else {}
    out: dict[str, dict[str, Any]] = {}
    for key, opts in raw.items():
        path = f"{field}.{key}"
        if not isinstance(key, str) or not _is_location_key(key):
            hint = "unknown protocol" if isinstance(opts, dict) else \
                "not a protocol or URL prefix (options of one location go under its key, e.g. storage_options.s3)"
            raise ValueError(f"{path}: {hint}")
        norm = _prefix_key(key) if "://" in key else protocol_of(f"{key}://")
        if norm in out:
            raise ValueError(f"{path}: the same location is given twice")
        out[norm] = _check_location(path, protocol_of(norm) if "://" in norm else norm, opts)
    return out


def merge_options(*layers: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Nested options of several layers merged per location, later layers winning option by option
    (e.g. a `_job.json` record, then the options given to `fpn resume`). Each layer may be flat or nested."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for location, opts in normalize_options(layer).items():
            out[location] = {**out.get(location, {}), **opts}
    return out


def _prefix_matches(prefix: str, url: str) -> bool:
    """`s3://bucket/data/` matches `s3://bucket/data/x.mp4` and `s3://bucket/data`, not `s3://bucket/data2/x`."""
    stem = prefix.rstrip("/")
    return url == stem or url.startswith(stem + "/")


def options_for(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options of one URL: its protocol's dict, then every matching URL prefix's dict merged over it,
    shortest prefix first (so the longest prefix wins). A URL with no entry gets `{}`. `options` may be
    nested or the legacy flat form (s3 only)."""
    nested = normalize_options(options)
    proto = protocol_of(url)
    target = _prefix_key(url) if proto != "file" else f"file://{_local_canonical(url)}"
    out = dict(nested.get(proto, {}))
    prefixes = sorted((k for k in nested if "://" in k and _prefix_matches(k, target)), key=len)
    for prefix in prefixes:
        out.update(nested[prefix])
    return out


def _s3_options(opts: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with the endpoint taken from the environment when none is given (as the AWS CLI
    does), botocore's adaptive retries with backoff, so throttling (SlowDown, 503) is retried, and 32 connections."""
    opts = dict(opts)
    client_kwargs = dict(opts.get("client_kwargs") or {})
    if not opts.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"max_attempts": 10, "mode": "adaptive"})
    # botocore's 10 connections held the lookups of a manifest's entries (`sources.MANIFEST_THREADS`) to 10 at once
    config_kwargs.setdefault("max_pool_connections", 32)
    opts["config_kwargs"] = config_kwargs
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it, built with that URL's options only
    (see `options_for`; the legacy flat form is read as s3 options)."""
    opts = options_for(url, storage_options)
    if protocol_of(url) == "s3":
        opts = _s3_options(opts)
    return url_to_fs(url, **opts)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def parquet_files(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    """Finished Parquet files in `directory` (none if it does not exist). Files being written carry a
    temporary dot-name until they are complete, and are left out.

    Listed afresh each time: other processes write these files, and s3fs answers a listing it made before from its
    cache (a job's driver, listing `frames/` while the writers wrote, counted 192 of the 600 frames it wrote)."""
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    return sorted(f for f in fs.glob(join(directory, "*.parquet")) if not f.rsplit("/", 1)[-1].startswith("."))


# ---------------------------------------------------------------------------------------------
# canonical identity

# Query parameters that sign a URL, compared case-insensitively. Removed from identities, masked by
# `redact_url`. Always: AWS SigV4 (`X-Amz-*`), GCS V4 (`X-Goog-*`), V2 signatures, bearer tokens.
_SIGNING_PREFIXES = ("x-amz-", "x-goog-")
_SIGNING_ALWAYS = frozenset({"signature", "awsaccesskeyid", "googleaccessid", "token", "access_token"})
# Only beside `Signature` (AWS/GCS V2, CloudFront): common words on their own.
_SIGNING_WITH_SIGNATURE = frozenset({"expires", "key-pair-id", "policy"})
# Azure SAS fields, only in a URL that carries `sig` (`sp`, `st`, `se` mean other things elsewhere).
_AZURE_SAS = frozenset({"sig", "se", "sp", "sv", "sr", "st", "spr", "srt", "ss", "si", "sdd", "ses", "skoid",
                        "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid"})


def _signing_params(names: list[str]) -> set[str]:
    """Which of a URL's query parameter names (lower-cased) sign it."""
    lower = {n.lower() for n in names}
    out = {n for n in lower if n.startswith(_SIGNING_PREFIXES) or n in _SIGNING_ALWAYS}
    if "signature" in lower:
        out |= lower & _SIGNING_WITH_SIGNATURE
    if "sig" in lower:
        out |= lower & _AZURE_SAS
    return out


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _canonical_http(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if parts.port and parts.port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{parts.port}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    signing = _signing_params([k for k, _ in pairs])
    query = urlencode(sorted((k, v) for k, v in pairs if k.lower() not in signing), quote_via=quote)
    return urlunsplit((scheme, host, parts.path or "/", query, ""))


def _local_canonical(path: str) -> str:
    if path.lower().startswith("file://"):
        path = unquote(urlsplit(path).path) if path[7:8] in ("", "/") else path[7:]
    path = os.path.abspath(os.path.expanduser(path))
    return re.sub(r"^/{2,}", "/", path)  # POSIX keeps a leading '//'; one file, one spelling


def canonical_uri(uri: str) -> str:
    """The identity of the object `uri` names, however it was spelled: a pure function, no I/O.

    - local paths, with or without `file://`: absolute and normalised (`os.path.abspath`: `.`, `..` and
      `//` collapsed) plain paths without scheme. Symlinks are NOT resolved (that would need I/O and
      would change with the filesystem): a file reached through two links has two identities.
    - `s3://`, `s3a://`, `s3n://`: `s3://bucket/key` with duplicate slashes collapsed.
    - `http(s)://`: scheme and host lower-cased, default port, userinfo and fragment dropped, signing
      query parameters (presigned S3/GCS URLs, Azure SAS, tokens) removed; other parameters kept, sorted.
    - any other protocol: fsspec's `protocol://path` form (its own path normalisation) with `//` collapsed.
    """
    proto = protocol_of(uri)
    if proto == "file":
        return _local_canonical(uri)
    if proto in ("http", "https"):
        return _canonical_http(uri)
    scheme, rest = uri.split("://", 1)
    if proto != "s3":
        try:
            cls = fsspec.get_filesystem_class(scheme.lower())
            rest = cls._strip_protocol(uri)
            scheme = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
        except (ImportError, ValueError):
            pass
    return f"{proto if proto == 's3' else scheme.lower()}://{re.sub(r'/{2,}', '/', rest)}"


# ---------------------------------------------------------------------------------------------
# redaction

# A key names a secret when one of its words (split at `_`, `-`, `.`, spaces and camelCase) is in
# _SECRET_WORDS, or its letters contain one of _SECRET_COMPOUNDS (`apiKey`, `AccountKey`, `sastoken`).
# Exceptions, listed by full name, hold no secret although they contain a secret word.
_SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
                           "creds", "sas", "sig", "signature", "auth", "authorization", "session", "cookie",
                           "cookies"})
_SECRET_COMPOUNDS = ("password", "passwd", "secret", "token", "credential", "privatekey", "accountkey", "accesskey",
                     "apikey", "signature", "authorization", "connectionstring")
_NOT_SECRET = frozenset({"key_prefix", "key_name", "session_name", "role_session_name", "auth_type", "token_type",
                         "signature_version"})


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def _is_secret_key(key: Any) -> bool:
    """Whether a mapping key or parameter name names a secret (rule above; `endpoint_url`, `anon`,
    `profile`, `region_name` and `key_prefix` do not)."""
    if not isinstance(key, str):
        return False
    words = _words(key)
    if "_".join(words) in _NOT_SECRET:
        return False
    joined = "".join(words)
    return any(w in _SECRET_WORDS for w in words) or any(c in joined for c in _SECRET_COMPOUNDS)


def redact_url(url: str) -> str:
    """`url` safe to show: the value of each signing query parameter (and of any parameter whose name
    names a secret) replaced by `***`, the name kept so a reader sees it was signed; a userinfo
    password replaced by `***`. Anything that is not a URL comes back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostport}"
    query = parts.query
    if query:
        items = query.split("&")
        names = [unquote(i.split("=", 1)[0]) for i in items]
        signing = _signing_params(names)
        query = "&".join(
            f"{i.split('=', 1)[0]}={REDACTED}" if "=" in i and (n.lower() in signing or _is_secret_key(n)) else i
            for i, n in zip(items, names))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_PAIR_RE = re.compile(r"(?<![\w.-])([A-Za-z_][\w.-]*)(\s*=\s*)(['\"]?)([^\s'\"&;,)}\]]+)")
_QUOTED_PAIR_RE = re.compile(r"(['\"])([\w.-]+)\1(\s*:\s*)(['\"])(.*?)\4")
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
# a terminal's escape sequences (colours, cursor moves): Ray colours the task name in its errors' first line
_ANSI_RE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) safe to show: every URL in it through `redact_url`,
    the value of each `name=value` or `'name': 'value'` pair whose name names a secret replaced
    by `***`, `Bearer <token>` credentials masked, and terminal escape sequences removed."""
    text = _ANSI_RE.sub("", text)
    text = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    text = _PAIR_RE.sub(lambda m: m.group(0) if not _is_secret_key(m.group(1)) or m.group(4) == REDACTED
                        else f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}", text)
    text = _QUOTED_PAIR_RE.sub(lambda m: m.group(0) if not _is_secret_key(m.group(2))
                               else f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{m.group(4)}{REDACTED}{m.group(4)}",
                               text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact(obj: Any) -> Any:
    """`obj` (storage options, a job record, any JSON-like value) safe to print or write.

    Recursive over dicts, lists and tuples: the value of a key that names a secret becomes `***`
    (None and booleans are kept: they hold no secret); every string elsewhere goes through
    `redact_text` (URLs lose their signatures, `AccountKey=...` pairs their values)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _is_secret_key(k) and v is not None and not isinstance(v, bool) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def drop_redacted(obj: Any) -> Any:
    """`obj` without the entries `redact` masked (dict values equal to `***`), e.g. options read back
    from a `_job.json` record before the real ones are merged over them."""
    if isinstance(obj, dict):
        return {k: drop_redacted(v) for k, v in obj.items() if v != REDACTED}
    if isinstance(obj, (list, tuple)):
        return type(obj)(drop_redacted(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# plain errors

_NO_CREDENTIALS = ("{what}: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                   "or storage_options.s3)")
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem",
                 "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidSecurity", "RequestTimeTooSkewed",
                 "403", "Forbidden", "AuthorizationHeaderMalformed"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion", "NoSuchUpload"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable", "503", "429"}


def first_line(e: BaseException) -> str:
    """An error's first line (its type's name when it has no text). One that refers to the error before it for details
    (rasterio: "Read failed. See previous exception for details.") says that one's first line too, as it was raised
    from it: a truncated GeoTIFF's error row named no cause."""
    text = str(e)
    msg = text.splitlines()[0] if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and "previous exception" in msg and str(cause):
        msg = f"{msg.rstrip('.')}: {str(cause).splitlines()[0]}"
    return msg


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`: an error as the one-line summaries and error rows give it, without
    terminal escape sequences (a Ray task's error colours the task's name)."""
    text = _ANSI_RE.sub("", str(e))
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def exception_chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from or during (s3fs keeps botocore's as `__cause__`)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _client_error(e: BaseException) -> tuple[str, str, dict] | None:
    """(code, HTTP status, error dict) of a botocore ClientError."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    err = response.get("Error") or {}
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    return str(err.get("Code", "")), status, err


def _http_error(e: BaseException) -> tuple[str, str, dict] | None:
    """(reason, HTTP status, {}) of an aiohttp response error (http(s) inputs; fsspec raises them as is)."""
    status = getattr(e, "status", None)
    if type(e).__name__ != "ClientResponseError" or not isinstance(status, int):
        return None
    return str(getattr(e, "message", "") or status), str(status), {}


def _endpoint(e: BaseException) -> str:
    url = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
    if url:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"
    host, port = getattr(e, "host", None), getattr(e, "port", None)
    return f"{host}:{port}" if host else "the storage endpoint"


def _bucket(err: dict, what: str) -> str:
    if err.get("BucketName"):
        return str(err["BucketName"])
    m = re.search(r"\b(?:s3[an]?|gs|gcs)://([^/\s]+)", what)
    return m.group(1) if m else "(unknown)"


def _translate(e: BaseException, what: str) -> BaseException | None:
    from botocore.exceptions import (ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError, ProfileNotFound)

    chain = list(exception_chain(e))
    for exc in chain:
        if isinstance(exc, ProfileNotFound):
            return ValueError(f"{what}: AWS profile {exc.kwargs.get('profile')} not found (in ~/.aws/config, "
                              "~/.aws/credentials, or the files AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE name)")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)) or "Unable to locate credentials" in str(exc):
            return PermissionError(_NO_CREDENTIALS.format(what=what))
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return ConnectionError(f"{what}: cannot reach {_endpoint(exc)} ({type(exc).__name__})")
        found = _client_error(exc) or _http_error(exc)
        if found is None:
            continue
        code, status, err = found
        if code == "NoSuchBucket":
            return FileNotFoundError(f"{what}: bucket {_bucket(err, what)} does not exist")
        if code in _DENIED_CODES or status in ("401", "403"):
            return PermissionError(f"{what}: access denied ({code})")
        if code in _MISSING_CODES or status == "404":
            return FileNotFoundError(f"{what} does not exist")
        if code in _THROTTLE_CODES or status in ("503", "429"):
            return OSError(f"{what}: throttled by the storage service ({code}), still failing after retries")
    for exc in chain:
        if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)) or type(exc).__name__ == "ClientConnectorError":
            return ConnectionError(f"{what}: cannot reach {_endpoint(exc)} ({type(exc).__name__})")
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{what} does not exist")
    if isinstance(e, PermissionError):
        return PermissionError(f"{what}: access denied")
    text = str(e)
    if "NoSuchKey" in text or "Not Found" in text:
        return FileNotFoundError(f"{what} does not exist")
    if "AccessDenied" in text or "Forbidden" in text:
        return PermissionError(f"{what}: access denied")
    return None


def translate_error(e: BaseException, what: str) -> BaseException:
    """A storage error as the built-in a user expects, one line naming `what`, secrets redacted:
    PermissionError (no credentials, access denied, bad key or signature), FileNotFoundError (no such
    bucket, key or object), ConnectionError (endpoint unreachable, named), OSError "throttled" (after
    botocore's retries), ValueError (an AWS profile that does not exist). Anything else comes back as it is. Raise it
    `from e` to keep the cause."""
    out = _translate(e, what)
    if out is None:
        return e
    out.args = (redact_text(out.args[0]),)
    return out


def check_file_destination(url: str, example: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse a destination for one file (an export, a report, a picture) that is an existing directory, before
    any work: writing there failed late with a traceback, or (fsspec's local transaction) replaced nothing and
    made the directory unreadable (mode 644). `example`: a file name to suggest inside it."""
    fs, path = filesystem(url, storage_options)
    if fs.isdir(path):
        raise ValueError(f"{url} is a directory: name the file to write (e.g. {url.rstrip('/')}/{example})")


def check_endpoint(url: str, storage_options: dict[str, Any] | None, what: str) -> None:
    """ConnectionError, at once, when the S3 endpoint that `url`'s options name (`endpoint_url`: MinIO, a moto or
    Ceph gateway...) refuses or does not answer a TCP connection: botocore's retries (10 attempts, adaptive) and
    s3fs's (5) took 69 s (an input) to 2 min 38 s (an output) before the same line. For the checks before a job
    (each endpoint once a process, once it answered); its workers keep the retries, which ride out a server's
    restart mid-job."""
    if protocol_of(url) != "s3":
        return
    opts = _s3_options(options_for(url, storage_options))
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    if not endpoint:
        return
    try:
        _reach(endpoint)
    except OSError as e:
        raise ConnectionError(redact_text(f"{what}: cannot reach {endpoint} ({e.strerror or type(e).__name__})")) from e


@lru_cache(maxsize=64)
def _reach(endpoint: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to `endpoint`'s host and port, closed at once (OSError when there is none)."""
    parts = urlsplit(endpoint)
    socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                             timeout=timeout_s).close()


# ---------------------------------------------------------------------------------------------
# remote files read by byte ranges, and local copies for libraries that need a file path

# Bytes fetched per remote request (fsspec's cache block). GDAL reads a COG's header in small pieces and each
# tile in one read; PyAV reads a video's header and index (MP4 `moov`) once per open, then the packets it
# decodes, in reads of its 32 KiB I/O buffer. A small block keeps the cost of a window or a video segment close
# to the bytes it decodes, where s3fs's default (50 MiB) would fetch most of a scene, or a segment's neighbours,
# for one read. (benchmarks/ranged_reads.py, a 2500-frame clip in 10 segments, every frame decoded: the segments
# read 1.34x the object with 64 KiB blocks, 1.63x with 128 KiB, 1.22x with 8 KiB in 6.5x the requests.)
REMOTE_BLOCK = 1 << 16


def ranged_opener(url: str, storage_options: dict[str, Any] | None = None, *, block_size: int = REMOTE_BLOCK,
                  cache_type: str = "readahead") -> Callable[..., Any]:
    """`open(path=None, mode="rb")`: a seekable binary file object over remote `url` (or another `path` of its
    filesystem: GDAL probes sidecar files) that fetches byte ranges as they are read, `block_size` bytes past
    each read, never the whole object. The one opener of remote files: rasters (rasterio's `opener=`) and
    videos (PyAV reads a Python file object) both use it. Storage errors come out as built-ins naming `url`."""
    fs, own = filesystem(url, storage_options)

    def open_(path: str | None = None, mode: str = "rb"):
        try:
            return fs.open(path or own, mode, block_size=block_size, cache_type=cache_type)
        except Exception as e:
            raise translate_error(e, url) from e

    return open_


def open_ranged(url: str, storage_options: dict[str, Any] | None = None, **kwargs: Any):
    """`ranged_opener(url, storage_options, **kwargs)()`: one remote file, read by byte ranges."""
    return ranged_opener(url, storage_options, **kwargs)()


_COPY_CHUNK = 8 << 20


@contextlib.contextmanager
def local_copy(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local file path for `url` while the block runs: the path itself for local files, else a
    temporary copy that cannot leak when the task is killed. For libraries that take nothing but a path
    (a video backend plugin, `fpn render`); the pipeline's own decoders read remote files by ranges
    (`ranged_opener`).

    On Linux the copy is an unnamed file (`tempfile.TemporaryFile`: O_TMPFILE or unlinked at once), so
    it never appears in the temporary directory; the path handed out is `/proc/self/fd/N`, which
    decord, PyAV and rasterio/GDAL open like any file, valid in this process while the block runs.
    Elsewhere: a named temporary file deleted on exit.
    """
    if protocol_of(url) == "file":
        yield _local_canonical(url)
        return
    fs, path = filesystem(url, storage_options)
    suffix = os.path.splitext(path.split("?", 1)[0])[1]
    linux = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
    tmp = tempfile.TemporaryFile(prefix="fpn-", suffix=suffix) if linux else \
        tempfile.NamedTemporaryFile(prefix="fpn-", suffix=suffix, delete=False)
    try:
        try:
            with fs.open(path, "rb") as src:
                shutil.copyfileobj(src, tmp, _COPY_CHUNK)
            tmp.flush()
        except Exception as e:
            raise translate_error(e, url) from e
        log.debug("copied %s to an unnamed local file (%d bytes)", redact_url(url), tmp.tell())
        yield f"/proc/self/fd/{tmp.fileno()}" if linux else tmp.name
    finally:
        tmp.close()
        if not linux:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.name)


def _iso(value: Any) -> str | None:
    """A listing's version stamp as a string: an ISO 8601 UTC time for times and epoch seconds."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.astimezone(_dt.timezone.utc).isoformat()
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc).isoformat()
    return str(value)


_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "Last-Modified", "updated", "modified", "created")


def object_mtime(info: dict[str, Any]) -> float | None:
    """When an object was last written (epoch seconds) from its fsspec `info`/listing entry: `mtime` of local
    files, `LastModified` on S3, `updated` on GCS, an HTTP `Last-Modified`; None when the entry does not say."""
    for key in _MTIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, _dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        try:
            when = _dt.datetime.fromisoformat(str(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(str(value))  # an HTTP date
            except (TypeError, ValueError):
                continue
        return (when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)).timestamp()
    return None


def object_version(info: dict[str, Any]) -> str | None:
    """The version of an object from its fsspec `info`/listing entry, to tell that a source changed:
    its ETag (quotes stripped) on object storage and HTTP, else its modification time (ISO, UTC)."""
    for key in ("ETag", "etag", "generation", "version_id", "VersionId"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in _MTIME_KEYS:
        if info.get(key) is not None:
            return _iso(info[key])
    return None
