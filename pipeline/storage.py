"""fsspec access for local paths, s3:// and any other fsspec URL, with credentials kept out of sight.

Storage options (endpoint URL, profile, anonymous access) come from the job spec or flags; keys come
from the usual AWS variables. `redact` removes secrets before anything is printed or written.
"""
from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = ["filesystem", "join", "parquet_files", "redact", "translate_error", "local_path"]

_SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                "aws_session_token", "session_token"}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it. Options apply to remote protocols only."""
    opts = dict(storage_options or {}) if _protocol(url) != "file" else {}
    if _protocol(url) == "s3":
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    return url_to_fs(url, **opts)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def parquet_files(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    """Finished Parquet files in `directory` (none if it does not exist). Files being written carry a
    temporary dot-name until they are complete, and are left out."""
    if not fs.exists(directory):
        return []
    return sorted(f for f in fs.glob(join(directory, "*.parquet")) if not f.rsplit("/", 1)[-1].startswith("."))


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options safe to print or write: secrets replaced by '***'."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif k.lower() in _SECRET_KEYS:
            out[k] = "***"
        else:
            out[k] = v
    return out


def translate_error(e: BaseException, what: str) -> BaseException:
    """A storage error as the built-in a user expects, naming `what` (cause kept by the caller)."""
    text = str(e)
    if isinstance(e, FileNotFoundError) or "NoSuchKey" in text or "NoSuchBucket" in text or "Not Found" in text:
        return FileNotFoundError(f"{what}: not found")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return PermissionError(f"{what}: access denied")
    return e


def local_path(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, bool]:
    """A local file path for `url`: the path itself for local files, else a downloaded temporary copy.

    Returns `(path, is_temporary)`; the caller removes temporary copies.
    """
    fs, path = filesystem(url, storage_options)
    if _protocol(url) == "file":
        return path, False
    import tempfile

    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="fpn-", suffix=suffix)
    os.close(fd)
    try:
        fs.get_file(path, tmp)
    except Exception as e:
        os.unlink(tmp)
        raise translate_error(e, url) from e
    return tmp, True
