"""The S3 object store: files and folders to and from ``s3://bucket/key`` URIs, over the `minio` SDK.

This is the library's only S3 code. It speaks plain S3, so it works against MinIO, SeaweedFS (the store
Kubeflow Pipelines installs since 2.15) and AWS alike. `Store.from_env()` reads

- ``S3_ENDPOINT``: ``http://host:port`` or ``https://host:port`` (the scheme decides TLS);
- ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``;
- ``AWS_REGION`` (optional; without it the client asks the store for each bucket's region).

Guarantees:

- Atomic publish: `put_file` uploads under a temporary key ``<key>.tmp-<32 hex>``, copies it server-side
  to the final key, then deletes the temporary one, so a reader never sees half an object at the final key.
  `list` and `get_dir` skip temporary keys that an upload in flight may leave visible.
- Integrity: the sha256 of the content goes to the object's user metadata (``x-amz-meta-sha256``);
  `get_file` checks it, downloads to a temporary file beside the target and moves it into place only then.
- Large files go up in parts (`PART_SIZE`, 16 MiB by default); a multipart upload that fails or is interrupted is
  aborted (best effort: not while the store is down), so its parts do not stay on the store's disk.
- Connection errors and 5xx answers are retried with exponential backoff; 4xx answers are not.
- Every failure a user can fix raises `UnpoisonError` ("<problem>; <fix>"): wrong credentials, an
  unreachable endpoint, a missing object or bucket.

`fetch(uri)` gives a local copy of an object or a folder in a cache folder (``$UNPOISON_CACHE``, else
``~/.cache/unpoison``), reusing files whose sha256 already matches; `components.data.load_images` uses it
for ``s3://`` sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.error import InvalidResponseError, S3Error, ServerError

from components.errors import UnpoisonError

MiB = 1024 * 1024
PART_SIZE = 16 * MiB  # multipart part size; S3 allows 5 MiB .. 5 GiB and at most 10,000 parts
ATTEMPTS = 4  # tries per request on connection errors and 5xx answers
BACKOFF_S = 0.5  # first wait between tries; doubles each time
TMP_KEY = re.compile(r"\.tmp-[0-9a-f]{32}$")  # temporary keys of uploads in flight
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}
_ENV_FIX = "export S3_ENDPOINT=http://host:port and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the store"


def parse_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/key"`` -> ``("bucket", "key")``; the key may be empty or a prefix ending in ``/``."""
    parts = urlsplit(str(uri))
    bucket, key = parts.netloc, parts.path[1:]
    if parts.scheme != "s3" or not _BUCKET.match(bucket) or parts.query or parts.fragment:
        raise UnpoisonError(
            f"'{uri}' is not an S3 URI; write it as s3://bucket/key, with a bucket name of 3-63 lowercase "
            "letters, digits, dots or hyphens"
        )
    return bucket, key


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where `fetch` keeps copies: ``$UNPOISON_CACHE``, else ``$XDG_CACHE_HOME/unpoison`` or ``~/.cache/unpoison``."""
    if os.environ.get("UNPOISON_CACHE"):
        return Path(os.environ["UNPOISON_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unpoison"


def fetch(uri: str, cache: str | os.PathLike | None = None, store: "Store | None" = None) -> Path:
    """Local copy of the object or folder at `uri`, under ``<cache>/s3/<bucket>/<key>``.

    A key that names an object gives that file; anything else is read as a folder prefix and gives a folder
    that mirrors it (local files no longer in the store are removed). Files whose sha256 already matches are
    not downloaded again.
    """
    store = store or Store.from_env()
    bucket, key = parse_uri(uri)
    root = Path(cache) if cache is not None else cache_dir()
    local = _inside(root / "s3" / bucket, key, uri)
    if key and not key.endswith("/") and store.exists(uri):
        return store.get_file(uri, local, reuse=True)
    kept = set(store.get_dir(uri, local, reuse=True))
    for stale in [p for p in local.rglob("*") if p.is_file() and p not in kept]:
        stale.unlink()
    return local


class Store:
    """One S3 endpoint and its credentials; `client` is the underlying `minio.Minio` for anything else."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        region: str | None = None,
        part_size: int = PART_SIZE,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        client: Minio | None = None,
    ):
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/") or url.query:
            raise UnpoisonError(f"S3 endpoint '{endpoint}' is not http(s)://host:port; set S3_ENDPOINT to e.g. "
                                "http://127.0.0.1:8333 (https:// for TLS)")
        if not 5 * MiB <= part_size <= 5 * 1024 * MiB:
            raise ValueError(f"part_size {part_size} is outside S3's 5 MiB .. 5 GiB")
        self.endpoint, self.part_size, self.attempts, self.backoff_s = endpoint, part_size, attempts, backoff_s
        # our own HTTP pool without urllib3's retries: `_call` retries whole operations, with backoff
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=300), maxsize=10, retries=False,
            cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self.client = client or Minio(url.netloc, access_key, secret_key, secure=url.scheme == "https",
                                      region=region, http_client=http)
        self._buckets: set[str] = set()  # buckets known to exist

    @classmethod
    def from_env(cls, **kwargs) -> "Store":
        """A store from S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optional AWS_REGION."""
        names = ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        missing = [n for n in names if not os.environ.get(n)]
        if missing:
            raise UnpoisonError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; {_ENV_FIX}")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(*(os.environ[n] for n in names), region=region, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # files and folders

    def put_file(self, local: str | os.PathLike, uri: str) -> str:
        """Upload one file to `uri` atomically, with its sha256 in the metadata; returns `uri`."""
        local = Path(local)
        if not local.is_file():
            raise UnpoisonError(f"'{local}' is not a file; pass an existing file to upload")
        bucket, key = self._object(uri)
        self.ensure_bucket(bucket)
        meta = {"sha256": sha256_file(local)}
        size = local.stat().st_size
        part_size = max(self.part_size, -(-size // (10_000 * MiB)) * MiB)  # at most 10,000 parts
        tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        try:
            self._call(uri, self.client.fput_object, bucket, tmp, str(local), metadata=meta, part_size=part_size)
            # publish: one server-side copy makes the complete object appear under its final key
            self._call(uri, self.client.copy_object, bucket, key, CopySource(bucket, tmp),
                       metadata=meta, metadata_directive=REPLACE)
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.remove_object(bucket, tmp)  # best effort: the store may be what failed
            raise
        finally:
            if size > part_size:  # went up in parts (minio's rule), so a failed try may have left an upload open
                self._abort_uploads(bucket, tmp)
        self._call(uri, self.client.remove_object, bucket, tmp)
        return uri

    def get_file(self, uri: str, local: str | os.PathLike, reuse: bool = False) -> Path:
        """Download `uri` to `local` (checked against its sha256, then moved into place); returns `local`.

        With `reuse`, a `local` file whose sha256 matches the object's is kept and nothing is downloaded.
        """
        bucket, key = self._object(uri)
        local = Path(local)
        if reuse and local.is_file():
            stat = self._call(uri, self.client.stat_object, bucket, key)
            recorded = stat.metadata.get("x-amz-meta-sha256")
            if recorded and stat.size == local.stat().st_size and sha256_file(local) == recorded:
                return local
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            recorded, actual = self._call(uri, self._download, bucket, key, tmp)
            if recorded and recorded != actual:
                raise UnpoisonError(f"{uri} does not match the sha256 recorded when it was uploaded; "
                                    "the object was changed or damaged in the store: upload it again")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def put_dir(self, local_dir: str | os.PathLike, uri_prefix: str,
                on_upload: Callable[[str], object] | None = None) -> list[str]:
        """Upload every file under `local_dir` to ``<uri_prefix>/<relative path>``; returns the URIs.

        Files go up in the order they were written (oldest first), so a file that a writer adds last to mark
        a folder complete (``model.json`` of a model) is also published last. `on_upload(uri)` follows each.
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise UnpoisonError(f"'{root}' is not a folder; pass an existing folder to upload")
        bucket, prefix = parse_uri(uri_prefix)
        files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_mtime_ns, p))
        if not files:
            raise UnpoisonError(f"folder '{root}' holds no files; pass a folder with files to upload")
        uris = []
        for f in files:
            uris.append(self.put_file(f, f"s3://{bucket}/{_folder(prefix)}{f.relative_to(root).as_posix()}"))
            if on_upload:
                on_upload(uris[-1])
        return uris

    def get_dir(self, uri_prefix: str, local_dir: str | os.PathLike, reuse: bool = False) -> list[Path]:
        """Download every object under `uri_prefix` (read as a folder) into `local_dir`; returns the files."""
        bucket, prefix = parse_uri(uri_prefix)
        prefix, root = _folder(prefix), Path(local_dir)
        keys = self._keys(bucket, prefix, uri_prefix)
        if not keys:
            raise UnpoisonError(f"no objects under {uri_prefix}; check the URI, or upload a folder there with "
                                f"`unpoison data push <folder> {uri_prefix}`")
        return [self.get_file(f"s3://{bucket}/{k}", _inside(root, k[len(prefix):], uri_prefix), reuse) for k in keys]

    def exists(self, uri: str) -> bool:
        """Whether an object is stored at `uri` (a missing bucket counts as missing)."""
        bucket, key = self._object(uri)
        return self._call(uri, self.client.stat_object, bucket, key, missing_ok=True) is not None

    def remove(self, uri: str) -> None:
        """Delete the object at `uri` (nothing happens when there is none)."""
        bucket, key = self._object(uri)
        self._call(uri, self.client.remove_object, bucket, key, missing_ok=True)

    def list(self, uri_prefix: str) -> list[str]:
        """URIs of the objects under `uri_prefix` (read as a folder), in key order."""
        bucket, prefix = parse_uri(uri_prefix)
        return [f"s3://{bucket}/{k}" for k in self._keys(bucket, _folder(prefix), uri_prefix)]

    def fingerprint(self, uri: str) -> str:
        """sha256 over the key (relative to `uri`), ETag and size of the object at `uri`, or of every object under
        it (read as a folder, as `fetch` reads it): one listing, no download. It changes when any object's content
        does (an ETag is the store's hash of the content as uploaded)."""
        bucket, key = parse_uri(uri)
        if key and not key.endswith("/"):
            stat = self._call(uri, self.client.stat_object, bucket, key, missing_ok=True)
            if stat is not None:
                return hashlib.sha256(f"{stat.etag}\t{stat.size}".encode()).hexdigest()
        prefix = _folder(key)

        def listing():
            return [(o.object_name, o.etag, o.size) for o in self.client.list_objects(bucket, prefix, recursive=True)]

        objects = sorted(o for o in (self._call(uri, listing, missing_ok=True) or [])
                         if not o[0].endswith("/") and not TMP_KEY.search(o[0]))
        if not objects:
            raise UnpoisonError(f"no objects under {uri}; check the URI, or upload a folder there with "
                                f"`unpoison data push <folder> {uri}`")
        h = hashlib.sha256()
        for name, etag, size in objects:
            h.update(f"{name[len(prefix):]}\t{etag}\t{size}\n".encode())
        return h.hexdigest()

    def ensure_bucket(self, bucket: str) -> None:
        """Create `bucket` unless it exists."""
        if bucket in self._buckets:
            return
        uri = f"s3://{bucket}"
        parse_uri(uri)
        if not self._call(uri, self.client.bucket_exists, bucket):
            try:
                self._call(uri, self.client.make_bucket, bucket)
            except UnpoisonError as e:
                if not isinstance(e.__cause__, S3Error) or e.__cause__.code != "BucketAlreadyOwnedByYou":
                    raise
        self._buckets.add(bucket)

    # ----------------------------------------------------------------------------------------------
    # internals

    def _object(self, uri: str) -> tuple[str, str]:
        bucket, key = parse_uri(uri)
        if not key or key.endswith("/"):
            raise UnpoisonError(f"'{uri}' names a folder, not an object; add the object's name, "
                                f"e.g. {uri.rstrip('/')}/train.parquet")
        return bucket, key

    def _keys(self, bucket: str, prefix: str, uri: str) -> list[str]:
        def names():
            return [o.object_name for o in self.client.list_objects(bucket, prefix, recursive=True)]

        listing = self._call(uri, names, missing_ok=True) or []  # a missing bucket holds nothing
        return sorted(k for k in listing if not k.endswith("/") and not TMP_KEY.search(k))

    def _abort_uploads(self, bucket: str, key: str) -> None:
        """Abort every unfinished multipart upload to `key`, best effort.

        minio aborts a multipart upload that fails, but only on an Exception (not a KeyboardInterrupt) and only
        if its abort request gets through, which it does not when the store itself crashed; a retry by `_call`
        then starts another upload. An upload never aborted keeps its parts on the store's disk, out of every
        listing. `key` is the temporary key of one `put_file` call, so every upload to it is that call's.
        Uses minio's private `_list_multipart_uploads` and `_abort_multipart_upload` (minio is pinned in
        pyproject.toml). A store that stays down keeps the upload: a bucket lifecycle rule
        (AbortIncompleteMultipartUpload) is the store's own remedy.
        """
        with contextlib.suppress(Exception):
            for upload in self.client._list_multipart_uploads(bucket, prefix=key).uploads:
                if upload.object_name == key:
                    self.client._abort_multipart_upload(bucket, key, upload.upload_id)

    def _download(self, bucket: str, key: str, tmp: Path) -> tuple[str | None, str]:
        """Stream the object into `tmp`; (sha256 from its metadata, sha256 of what arrived)."""
        response = self.client.get_object(bucket, key)
        try:
            h = hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in response.stream(MiB, decode_content=False):
                    f.write(chunk)
                    h.update(chunk)
            return response.headers.get("x-amz-meta-sha256"), h.hexdigest()
        finally:
            response.close()
            response.release_conn()

    def _call(self, uri: str, fn: Callable, *args, missing_ok: bool = False, **kwargs):
        """fn(*args, **kwargs), retried with exponential backoff on connection errors and 5xx answers.

        S3 errors become `UnpoisonError`s; with `missing_ok`, a missing object or bucket returns None.
        """
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if missing_ok and isinstance(e, S3Error) and e.code in ("NoSuchKey", "NoSuchBucket"):
                    return None
                if not _transient(e) or attempt == self.attempts - 1:
                    error = self._error(e, uri)
                    if error is e:
                        raise
                    raise error from e
                time.sleep(self.backoff_s * 2**attempt)

    def _error(self, e: Exception, uri: str) -> Exception:
        where = f"the S3 endpoint {self.endpoint}"
        if isinstance(e, S3Error):
            if e.code in _CREDENTIAL_CODES:
                return UnpoisonError(f"S3 rejected the credentials for {self.endpoint} ({e.code}); "
                                     "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            if e.code == "NoSuchBucket":
                return UnpoisonError(f"{uri} does not exist: {where} has no bucket '{parse_uri(uri)[0]}'; "
                                     "check the URI and S3_ENDPOINT, or create it with `unpoison data push`")
            if e.code == "NoSuchKey":
                return UnpoisonError(f"{uri} does not exist at {where}; check the URI and S3_ENDPOINT, "
                                     "or upload it with `unpoison data push`")
            if not _transient(e):
                return UnpoisonError(f"{where} refused the request for {uri} ({e.code}: {e.message}); "
                                     "check the URI and the store's permissions")
        if isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return UnpoisonError(f"cannot reach {where} ({_reason(e)}); "
                                 "check S3_ENDPOINT and that the store is running")
        if _transient(e):
            return UnpoisonError(f"{where} failed on {uri} {self.attempts} times ({_reason(e)}); "
                                 "retry later, or check the store's logs")
        if isinstance(e, (ServerError, InvalidResponseError)):
            return UnpoisonError(f"{where} gave an answer that is not S3's for {uri} ({_reason(e)}); "
                                 "check that S3_ENDPOINT points to an S3 store")
        return e


def _transient(e: Exception) -> bool:
    """Worth retrying: connection trouble or a 5xx answer."""
    if isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, S3Error):
        return e.response is not None and e.response.status >= 500
    if isinstance(e, ServerError):
        return e.status_code >= 500
    if isinstance(e, InvalidResponseError):  # a non-XML answer, e.g. a proxy's 502 page
        return getattr(e, "_code", 0) >= 500
    return False


def _folder(prefix: str) -> str:
    """A key prefix read as a folder: "" stays "", "a/b" becomes "a/b/"."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _inside(root: Path, relative: str, uri: str) -> Path:
    """root / relative, refusing keys that would land outside `root` ("..", absolute paths)."""
    if relative.startswith("/") or ".." in Path(relative).parts:
        raise UnpoisonError(f"object key under {uri} ('{relative}') would be written outside '{root}'; "
                            "rename the object without '..' or a leading '/'")
    return root / relative


def _reason(e: BaseException) -> str:
    # drop object reprs and urllib3's "HTTPConnection(host=..., port=...): ", which the message names already
    text = " ".join(re.sub(r"<[^>]*>:? ?|HTTPS?Connection\([^)]*\): ", "", str(e)).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
