"""Storage options per location, canonical source identity, redaction, plain S3 errors, local copies."""
from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
from botocore.exceptions import ClientError

from pipeline.output import check_output_location
from pipeline.sources import Source, expand_inputs
from pipeline.storage import (canonical_uri, filesystem, local_copy, normalize_options,
                              options_for, redact, redact_text, redact_url, translate_error)

PRESIGNED = ("https://bucket.s3.amazonaws.com/vids/clip.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20261125%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261125T000000Z"
             "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=deadbeefcafe")

# ----------------------------------------------------------------------------- options per location

OPTIONS = {
    "s3": {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIA", "secret": "s3cr3t"},
    "s3://public-bucket/": {"anon": True},
    "s3://public-bucket/private/": {"anon": False, "profile": "writer"},
    "https": {"headers": {"X-Who": "https"}},
    "https://example.com/data/": {"headers": {"X-Who": "data"}},
}


def test_options_for_merges_protocol_then_prefixes_longest_winning():
    assert options_for("s3://other/x.mp4", OPTIONS) == OPTIONS["s3"]
    assert options_for("s3://public-bucket/x.mp4", OPTIONS) == {**OPTIONS["s3"], "anon": True}
    assert options_for("s3://public-bucket/private/x.mp4", OPTIONS) == {**OPTIONS["s3"], "anon": False,
                                                                       "profile": "writer"}
    assert options_for("s3a://public-bucket/x.mp4", OPTIONS)["anon"] is True
    assert "anon" not in options_for("s3://public-bucket2/x.mp4", OPTIONS)  # a prefix ends at a '/'
    assert options_for("https://example.com/data/a.mp4", OPTIONS) == {"headers": {"X-Who": "data"}}
    assert options_for("https://example.com/database.mp4", OPTIONS) == {"headers": {"X-Who": "https"}}


def test_options_never_reach_another_protocol():
    assert options_for("http://example.com/data/a.mp4", OPTIONS) == {}  # http is not https
    assert options_for("vids/clip.mp4", OPTIONS) == {}
    assert options_for("/data/in/a.mp4", {"file": {}, "file:///data/": {"auto_mkdir": True}}) == {"auto_mkdir": True}
    assert options_for("memory://x/clip.mp4", OPTIONS) == {}
    fs, _ = filesystem("https://example.com/a.mp4", OPTIONS)
    assert fs.kwargs == {"headers": {"X-Who": "https"}}  # what every aiohttp request receives


def test_legacy_flat_options_are_s3_options():
    flat = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"}
    assert normalize_options(flat) == {"s3": flat}
    assert options_for("s3://b/x", flat) == flat
    assert options_for("https://example.com/x", flat) == {}
    assert normalize_options(None) == {} and normalize_options({}) == {}


@pytest.mark.parametrize("raw, message", [
    ({"https": {"key": "k"}}, r"^storage_options\.https\.key: not an option of the https filesystem \(known: .*headers"),
    ({"s3x": {"key": "k"}}, r"^storage_options\.s3x: unknown protocol"),
    ({"s3": {"endpoint": "x"}}, r"^storage_options\.s3\.endpoint: not an option of the s3 filesystem"),
    ({"s3": {"key": "k"}, "endpoint_url": "x"}, r"^storage_options\.endpoint_url: not a protocol or URL prefix"),
    ({"s3": "anon"}, r"^storage_options\.s3: expected a mapping"),
    ({"endpoint_urll": "x"}, r"^storage_options\.endpoint_urll: not an option of the s3 filesystem"),
    ({"s3://b/": {"headers": {}}}, r"^storage_options\.s3://b/\.headers: not an option of the s3 filesystem"),
    ({"http": {"auth": ["u", "p"]}}, r"^storage_options\.http\.auth: not an option"),
])
def test_invalid_options_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        normalize_options(raw)


def test_a_protocol_whose_package_is_missing_is_named():
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"^spec\.storage_options\.gcs: the filesystem package for gcs is not installed"):
        normalize_options({"gcs": {"project": "p"}}, field="spec.storage_options")


class _Recorder(http.server.SimpleHTTPRequestHandler):
    seen: list[dict] = []

    def end_headers(self):
        _Recorder.seen.append({"path": self.path, "headers": dict(self.headers)})
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving `tmp_path`, recording each request's headers."""
    _Recorder.seen = []
    handler = lambda *a, **k: _Recorder(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_s3_credentials_do_not_break_an_http_input(http_server):
    """The issue's repro: s3 keys and an endpoint plus an http input died with an aiohttp TypeError."""
    url, root = http_server
    (root / "clip.mp4").write_bytes(b"0123456789")
    options = {"s3": {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:1"},
               "http": {"headers": {"X-Fpn": "yes"}, "params": {"v": "1"}}}
    [src] = expand_inputs([f"{url}/clip.mp4"], options)
    assert src.url == f"{url}/clip.mp4" and src.canonical == f"{url}/clip.mp4" and src.size == 10
    fs, path = filesystem(src.url, options)
    with fs.open(path, "rb") as f:
        assert f.read() == b"0123456789"
    assert _Recorder.seen and all(r["headers"].get("X-Fpn") == "yes" and "v=1" in r["path"] for r in _Recorder.seen)


# ----------------------------------------------------------------------------- canonical identity

def test_canonical_uri_of_local_spellings_is_one_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = str(tmp_path / "vids" / "clip.mp4")
    spellings = ["vids/clip.mp4", "./vids/clip.mp4", "vids//./x/../clip.mp4", want, f"file://{want}",
                 "/" + want]
    assert {canonical_uri(s) for s in spellings} == {want}


def test_canonical_uri_does_not_resolve_symlinks(tmp_path):
    (tmp_path / "real.mp4").write_bytes(b"x")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "real.mp4")
    assert canonical_uri(str(tmp_path / "link.mp4")) == str(tmp_path / "link.mp4")


def test_canonical_uri_of_s3_spellings():
    assert canonical_uri("s3a://bucket//vids//clip.mp4") == "s3://bucket/vids/clip.mp4"
    assert canonical_uri("s3n://bucket/vids/clip.mp4") == "s3://bucket/vids/clip.mp4"
    assert canonical_uri("s3://bucket/vids/clip.mp4") == "s3://bucket/vids/clip.mp4"


def test_presigned_url_has_the_identity_of_the_unsigned_url():
    plain = "https://bucket.s3.amazonaws.com/vids/clip.mp4"
    assert canonical_uri(PRESIGNED) == plain
    assert canonical_uri(plain) == plain
    assert canonical_uri("HTTPS://user:pw@Bucket.S3.AmazonAWS.com:443/vids/clip.mp4#t=3") == plain
    gcs = "https://storage.googleapis.com/b/clip.mp4?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=ab"
    assert canonical_uri(gcs) == "https://storage.googleapis.com/b/clip.mp4"
    sas = "https://acct.blob.core.windows.net/c/clip.mp4?sv=2022-11-02&sp=r&st=1&se=2&sr=b&spr=https&sig=abc%3D"
    assert canonical_uri(sas) == "https://acct.blob.core.windows.net/c/clip.mp4"


def test_http_identity_drops_default_port_and_sorts_other_parameters():
    assert canonical_uri("http://Example.com:80/a.mp4?b=2&a=1") == "http://example.com/a.mp4?a=1&b=2"
    assert canonical_uri("http://example.com:8080/a.mp4") == "http://example.com:8080/a.mp4"
    assert canonical_uri("https://example.com:443/a.mp4?st=3") == "https://example.com/a.mp4?st=3"  # not a SAS


def test_expand_inputs_gives_one_source_however_the_file_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vids").mkdir()
    clip = tmp_path / "vids" / "clip.mp4"
    clip.write_bytes(b"x" * 123)
    (tmp_path / "vids" / "notes.txt").write_text("not media")
    sources = expand_inputs(["vids/clip.mp4", "./vids/clip.mp4", "vids/", str(clip), "vids/*.mp4"])
    assert len(sources) == 1
    [src] = sources
    assert isinstance(src, Source)
    assert src.url == str(clip) and src.canonical == str(clip) and src.size == 123
    assert src.version
    os.utime(clip, (1_000_000_000, 1_000_000_000))
    assert expand_inputs(["vids/"])[0].version == "2001-09-09T01:46:40+00:00"  # a changed source shows


def test_expand_inputs_names_an_input_that_matches_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input .*missing\.mp4 does not exist"):
        expand_inputs([str(tmp_path / "missing.mp4")])
    with pytest.raises(FileNotFoundError, match="matches no media"):
        expand_inputs([str(tmp_path / "*.mkv")])


# ----------------------------------------------------------------------------- redaction

def test_redact_masks_secrets_in_nested_dicts_and_lists():
    record = {
        "storage_options": {
            "s3": {"key": "AKIA", "secret": "s3cr3t", "token": "tok", "endpoint_url": "http://127.0.0.1:9000",
                   "anon": False, "profile": "dev", "region_name": "eu-west-1", "key_prefix": "runs/",
                   "config_kwargs": {"signature_version": "s3v4"}},
            "az": {"account_name": "acct", "account_key": "AK==", "sas_token": "sv=1&sig=x",
                   "connection_string": "AccountName=acct;AccountKey=AK=="},
            "gcs": {"credentials": {"type": "service_account", "private_key": "-----BEGIN"}},
            "https": {"headers": {"Authorization": "Bearer abc", "X-Api-Key": "k", "Accept": "video/mp4"}},
        },
        "inputs": ["s3://b/a.mp4", PRESIGNED],
        "extra": [{"password": "hunter2"}, ("private_key", {"AWS_SESSION_TOKEN": "t"})],
    }
    out = redact(record)
    s3 = out["storage_options"]["s3"]
    assert s3 == {"key": "***", "secret": "***", "token": "***", "endpoint_url": "http://127.0.0.1:9000",
                  "anon": False, "profile": "dev", "region_name": "eu-west-1", "key_prefix": "runs/",
                  "config_kwargs": {"signature_version": "s3v4"}}
    assert out["storage_options"]["az"] == {"account_name": "acct", "account_key": "***", "sas_token": "***",
                                            "connection_string": "***"}
    assert out["storage_options"]["gcs"] == {"credentials": "***"}
    assert out["storage_options"]["https"]["headers"] == {"Authorization": "***", "X-Api-Key": "***",
                                                          "Accept": "video/mp4"}
    assert out["inputs"][0] == "s3://b/a.mp4"
    assert "deadbeefcafe" not in out["inputs"][1] and "X-Amz-Signature=***" in out["inputs"][1]
    assert out["extra"] == [{"password": "***"}, ("private_key", {"AWS_SESSION_TOKEN": "***"})]
    for secret in ("AKIA", "s3cr3t", "AK==", "BEGIN", "hunter2", "Bearer abc", "deadbeefcafe"):
        assert secret not in repr(out)
    assert record["storage_options"]["s3"]["key"] == "AKIA"  # the input is left alone


def test_redact_url_masks_signature_values_and_passwords_keeping_names():
    out = redact_url(PRESIGNED)
    assert out.startswith("https://bucket.s3.amazonaws.com/vids/clip.mp4?X-Amz-Algorithm=***")
    assert "X-Amz-Signature=***" in out and "X-Amz-Credential=***" in out and "AKIAEXAMPLE" not in out
    assert redact_url("https://user:pw@example.com/a.mp4?page=2#x") == "https://user:***@example.com/a.mp4?page=2#x"
    assert redact_url("s3://bucket/a.mp4") == "s3://bucket/a.mp4"
    assert redact_url("not a url") == "not a url"


def test_redact_text_masks_urls_and_secret_pairs_in_free_text():
    text = (f"cannot read {PRESIGNED}: aws_secret_access_key=abc123 AccountName=acct;AccountKey=xyz== "
            "{'token': 'tok'} Authorization: Bearer abcdefghijk endpoint_url=http://127.0.0.1:9000")
    out = redact_text(text)
    for secret in ("deadbeefcafe", "abc123", "xyz==", "'tok'", "abcdefghijk"):
        assert secret not in out
    assert "AccountName=acct" in out and "endpoint_url=http://127.0.0.1:9000" in out


def test_error_text_loses_terminal_escape_sequences():
    """Ray colours a task's name in its errors' first line: `_job.json`'s error and the summaries are plain text."""
    from pipeline.storage import one_line

    e = RuntimeError("RayTaskError(ValueError): \x1b[36mray::MapBatches(_Decode)()\x1b[39m (pid=1, ip=192.0.2.2)\nmore")
    assert one_line(e) == "RuntimeError: RayTaskError(ValueError): ray::MapBatches(_Decode)() (pid=1, ip=192.0.2.2)"
    assert redact_text("\x1b[1;31mfailed\x1b[0m at s3://b/k") == "failed at s3://b/k"


# ----------------------------------------------------------------------------- plain errors

def _client_error(code: str, status: int, operation: str = "GetObject", **extra) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} message", **extra},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


@pytest.mark.parametrize("code, status, kind, words", [
    ("AccessDenied", 403, PermissionError, "access denied"),
    ("InvalidAccessKeyId", 403, PermissionError, "access denied (InvalidAccessKeyId)"),
    ("SignatureDoesNotMatch", 403, PermissionError, "access denied"),
    ("NoSuchKey", 404, FileNotFoundError, "does not exist"),
    ("NoSuchBucket", 404, FileNotFoundError, "bucket my-bucket does not exist"),
    ("SlowDown", 503, OSError, "throttled"),
])
def test_translate_error_maps_botocore_codes(code, status, kind, words):
    err = _client_error(code, status, BucketName="my-bucket")
    wrapped = OSError("s3fs said so")
    wrapped.__cause__ = err  # how s3fs hands them on
    for e in (err, wrapped):
        out = translate_error(e, f"input {PRESIGNED}")
        assert type(out) is kind and words in str(out)
        assert "deadbeefcafe" not in str(out) and "X-Amz-Signature=***" in str(out)


@pytest.mark.parametrize("status, kind, words", [
    (403, PermissionError, "access denied"), (401, PermissionError, "access denied"),
    (404, FileNotFoundError, "does not exist"), (429, OSError, "throttled"),
])
def test_translate_error_maps_http_statuses(status, kind, words):
    from aiohttp import ClientResponseError, RequestInfo
    from multidict import CIMultiDict
    from yarl import URL

    info = RequestInfo(URL("https://h/a.mp4"), "GET", CIMultiDict(), URL("https://h/a.mp4"))
    out = translate_error(ClientResponseError(info, (), status=status, message="nope"), "input https://h/a.mp4")
    assert type(out) is kind and str(out).startswith("input https://h/a.mp4") and words in str(out)


def test_translate_error_leaves_other_errors_alone():
    e = ValueError("not storage")
    assert translate_error(e, "x") is e


@pytest.mark.slow
def test_s3_failures_speak_plainly(s3, monkeypatch, tmp_path):
    fs, endpoint = s3
    options = {"s3": {"endpoint_url": endpoint}}
    with pytest.raises(FileNotFoundError, match=r"^input s3://no-such-bucket/a\.mp4: bucket no-such-bucket does not exist$"):
        expand_inputs(["s3://no-such-bucket/a.mp4"], options)
    with pytest.raises(FileNotFoundError, match=r"^input s3://test/missing\.mp4 does not exist$"):
        expand_inputs(["s3://test/missing.mp4"], options)

    refused = {"s3": {"endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"retries": {"max_attempts": 1}}}}
    with pytest.raises(ConnectionError, match=r"cannot reach http://127\.0\.0\.1:1"):
        expand_inputs(["s3://test/a.mp4"], refused)

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_keys = {"s3": {"endpoint_url": endpoint, "anon": False, "skip_instance_cache": True}}
    with pytest.raises(PermissionError, match=r"^input s3://test/a\.mp4: no credentials \(set AWS_ACCESS_KEY_ID"):
        expand_inputs(["s3://test/a.mp4"], no_keys)


@pytest.mark.slow
def test_expand_inputs_lists_an_s3_prefix_with_etags(s3):
    fs, endpoint = s3
    fs.pipe("test/vids/a.mp4", b"aaaa")
    fs.pipe("test/vids/b.jpg", b"bb")
    fs.pipe("test/vids/c.txt", b"c")
    options = {"s3": {"endpoint_url": endpoint}}
    sources = expand_inputs(["s3://test/vids/", "s3a://test/vids/a.mp4"], options)
    assert [(s.canonical, s.size) for s in sources] == [("s3://test/vids/a.mp4", 4), ("s3://test/vids/b.jpg", 2)]
    assert sources[0].version == fs.info("test/vids/a.mp4")["ETag"].strip('"')
    fs.pipe("test/vids/deep/d.mp4", b"d")
    assert [s.canonical for s in expand_inputs(["s3://test/vids/**.mp4"], options)] == [  # as the README writes it
        "s3://test/vids/a.mp4", "s3://test/vids/deep/d.mp4"]


@pytest.mark.slow
def test_check_output_location_refuses_a_missing_bucket_and_never_creates_it(s3):
    fs, endpoint = s3
    options = {"s3": {"endpoint_url": endpoint}}
    with pytest.raises(FileNotFoundError, match=r"^output s3://nobucket/out: bucket nobucket does not exist"):
        check_output_location("s3://nobucket/out", options)
    fs.invalidate_cache()
    assert "nobucket" not in [b.rstrip("/") for b in fs.ls("")]
    check_output_location("s3://test/out", options)  # an existing bucket passes
    check_output_location("relative/out", options)  # local: nothing to check


def test_check_output_location_names_an_unreachable_endpoint():
    refused = {"s3": {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s",
                      "config_kwargs": {"retries": {"max_attempts": 1}}}}
    with pytest.raises(ConnectionError, match=r"^output s3://b/out: cannot reach http://127\.0\.0\.1:1"):
        check_output_location("s3://b/out", refused)


def test_an_s3_endpoint_that_refuses_connections_is_said_at_once_for_inputs_and_output():
    """With the retries jobs run with (botocore's adaptive 10 attempts, s3fs's 5), a refused endpoint took 69 s for
    an input and 2 min 38 s for an output before the same one line."""
    refused = {"s3": {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s"}}
    with pytest.raises(ConnectionError, match=r"^input s3://b/x.png: cannot reach http://127\.0\.0\.1:1 \(Connection "
                                              r"refused\)$"):
        expand_inputs(["s3://b/x.png"], refused)
    with pytest.raises(ConnectionError, match=r"^output s3://b/out: cannot reach http://127\.0\.0\.1:1 \(Connection "
                                              r"refused\)$"):
        check_output_location("s3://b/out", refused)


# ----------------------------------------------------------------------------- local copies

@pytest.fixture
def memory_media(make_video, tmp_path):
    """A video and a GeoTIFF on fsspec's in-memory filesystem: remote files that need a local copy."""
    import rasterio
    from rasterio.transform import from_origin

    mem = fsspec.filesystem("memory")
    mem.pipe("/fpn-test/clip.mp4", make_video("idx12.mp4", 12, 10.0).read_bytes())
    tif = tmp_path / "r.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=32, height=16, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(10, 50, 0.1, 0.1)) as ds:
        ds.write(np.full((3, 16, 32), 7, np.uint8))
    mem.pipe("/fpn-test/r.tif", tif.read_bytes())
    yield "memory://fpn-test"
    mem.rm("/fpn-test", recursive=True)


def test_local_copy_leaves_nothing_in_tmp_and_decoders_read_it(memory_media):
    import decord
    import rasterio

    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(os.listdir(tmp))
    with local_copy(f"{memory_media}/clip.mp4") as path:
        assert set(os.listdir(tmp)) == before  # no name to leak, even while open
        assert len(decord.VideoReader(path)) == 12
        av = pytest.importorskip("av")
        with av.open(path) as container:
            assert sum(1 for _ in container.decode(video=0)) == 12
    assert set(os.listdir(tmp)) == before
    with local_copy(f"{memory_media}/r.tif") as path:
        with rasterio.open(path) as ds:
            assert (ds.width, ds.height, str(ds.crs)) == (32, 16, "EPSG:4326") and ds.read().mean() == 7


def test_local_copy_of_a_local_file_is_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"x")
    with local_copy("./a.mp4") as path:
        assert path == str(tmp_path / "a.mp4")


def test_local_copy_of_a_missing_object_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="memory://fpn-test/none.mp4"):
        with local_copy("memory://fpn-test/none.mp4"):
            pass


def test_an_error_row_of_a_truncated_geotiff_says_the_cause_its_error_refers_to(tmp_path):
    """rasterio's "Read failed. See previous exception for details." was the whole row: no cause."""
    import rasterio

    from pipeline.output import error_row

    with rasterio.open(tmp_path / "full.tif", "w", driver="GTiff", width=400, height=400, count=3,
                       dtype="uint8") as ds:
        ds.write(np.random.default_rng(0).integers(0, 255, (3, 400, 400), np.uint8))
    (tmp_path / "cut.tif").write_bytes((tmp_path / "full.tif").read_bytes()[:150_000])
    with pytest.raises(rasterio.errors.RasterioIOError) as e, rasterio.open(tmp_path / "cut.tif") as ds:
        ds.read()
    message = error_row("cut.tif", "decode", e.value)["message"]
    assert message.startswith("Read failed. See previous exception for details: cut.tif, band ") and \
        "IReadBlock failed" in message, message
