"""Memes behind a URL (``s3://``, ``gs://``, ``file://``... anything fsspec opens): listing and reading bytes.

A URL to a folder (a prefix) gives one item per object under it, id = its path relative to the
folder (as :func:`~dhumor.inference.items.collect_items` does for a local folder); a URL to one object gives
that item (id = its name). Items keep the URL, as a string, in ``path``. Every problem a user can fix
(an unknown scheme, a filesystem package not installed, missing credentials, nothing at that URL) is
a :class:`~dhumor.errors.ConfigError` raised here, before any model loads.
"""
from __future__ import annotations

import posixpath
import re

from dhumor.errors import ConfigError, ImageError
from dhumor.images import DEFAULT_MAX_BYTES
from dhumor.inference.items import MANIFEST_SUFFIXES, Item

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_FS_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                "abfss": "adlfs", "hdfs": "pyarrow", "http": "aiohttp", "https": "aiohttp"}


def is_url(source: object) -> bool:
    """``scheme://...`` (a Windows drive letter or a plain path is not a URL)."""
    return isinstance(source, str) and bool(_URL.match(source))


def _credentials_problem(e: BaseException) -> bool:
    names = {type(c).__name__ for c in (e, e.__cause__, e.__context__) if c is not None}
    text = str(e).lower()
    return bool(names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                         "ClientAuthenticationError", "RefreshError"}) \
        or any(w in text for w in ("credential", "access denied", "accessdenied", "forbidden", "invalidaccesskeyid",
                                   "signaturedoesnotmatch", "unable to locate"))


def url_filesystem(url: str):
    """``(filesystem, path inside it)`` for a URL; ConfigError naming the fix when it cannot be used."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        pkg = _FS_PACKAGES.get(scheme, "the fsspec filesystem package for it")
        raise ConfigError(f"{url}: reading {scheme}:// needs {pkg} (pip install {pkg}): {e}") from None
    except OSError as e:  # a filesystem that connects on creation (ftp://, sftp://): host unknown or unreachable
        raise ConfigError(f"{url}: cannot reach it ({type(e).__name__}: {str(e)[:200]}); check the host") from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise ConfigError(f"{url}: unknown URL scheme {scheme!r}; give a local path or a URL fsspec knows "
                              f"(s3://, gs://, file://, ...)") from None
        raise ConfigError(f"{url}: {e}") from None


def _listing_error(url: str, e: BaseException) -> ConfigError:
    if isinstance(e, FileNotFoundError):
        return ConfigError(f"{url}: nothing there (no such object or prefix; check the bucket and path)")
    if _credentials_problem(e) or isinstance(e, PermissionError):
        return ConfigError(f"{url}: cannot read it: credentials missing or refused ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); set them (e.g. AWS_ACCESS_KEY_ID / "
                           f"AWS_PROFILE for s3) and rerun")
    return ConfigError(f"{url}: cannot list it ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


def check_url(url: str) -> None:
    """The URL's filesystem is installed, the credentials work and something is there (ConfigError if not)."""
    fs, root = url_filesystem(url)
    try:
        fs.info(root)
    except Exception as e:
        raise _listing_error(url, e) from None


def collect_url_items(url: str) -> list[Item]:
    """Items of the object or folder at ``url`` (see the module doc); ConfigError when it cannot be read."""
    fs, root = url_filesystem(url)
    try:
        info = fs.info(root)
        if info.get("type") == "directory":
            files = sorted(fs.find(root))
        else:
            files = None
    except Exception as e:  # botocore and gcsfs raise their own types for credentials
        raise _listing_error(url, e) from None
    if files is None:
        name = posixpath.basename(root.rstrip("/"))
        if posixpath.splitext(name)[1].lower() in MANIFEST_SUFFIXES:
            raise ConfigError(f"{url}: manifests behind a URL are not read yet; give the folder of images, or a "
                              f"local copy of the manifest")
        return [Item(name, fs.unstrip_protocol(root))]
    base = root.rstrip("/") + "/"
    return [Item(f[len(base):] if f.startswith(base) else posixpath.basename(f), fs.unstrip_protocol(f))
            for f in files if not f.endswith("/")]


def read_url_bytes(url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The object's bytes, or an ImageError saying why they cannot be read (as for a local file)."""
    fs, path = url_filesystem(url)
    try:
        size = fs.size(path)
        if size == 0:
            raise ImageError(url, "empty file (0 bytes)")
        if size is not None and size > max_bytes:
            raise ImageError(url, f"file is {size:,} bytes, over the {max_bytes:,}-byte limit")
        with fs.open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(url, "file not found") from None
    except Exception as e:
        raise ImageError(url, f"cannot read file: {type(e).__name__}: {e}") from None
    if not data:
        raise ImageError(url, "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(url, f"file is over the {max_bytes:,}-byte limit")
    return data
