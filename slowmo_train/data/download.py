"""Fetching public datasets into ``data.root`` (``data.download=auto|true``).

    fetch_file("https://host/archive.tar.gz", Path("data/cifar10/archive.tar.gz"), md5="...")

Downloads go to a temporary file next to the destination and are renamed into place only when
complete (and, when an MD5 is known, verified), so an interrupted download never looks like data.
Any URL scheme urllib understands works, including ``file://`` (a local mirror, and the tests'
stand-in for the internet). Failures raise :class:`DatasetError` saying where the data was to come
from and what to point ``data.root`` at instead when offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from slowmo_train.data.errors import DatasetError

log = logging.getLogger(__name__)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(url: str, dest: Path, md5: str | None = None, what: str = "the dataset", timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically; verify ``md5`` when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
    log.info("downloading %s from %s", what, url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as err:
        tmp.unlink(missing_ok=True)
        raise DatasetError(
            f"could not download {what} from {url} ({getattr(err, 'reason', err)}). Offline? Point data.root at "
            f"a local copy of {what} (or set data.download=false to never fetch)"
        ) from None
    if md5 is not None and (actual := md5sum(tmp)) != md5:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"{what} downloaded from {url} is corrupt (md5 {actual}, expected {md5}); try again")
    os.replace(tmp, dest)
    return dest


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack a (gzipped) tar into ``dest``, refusing members that would land outside it."""
    root = dest.resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (root / member.name).resolve()
            if root not in target.parents and target != root or member.issym() or member.islnk():
                raise DatasetError(f"{archive} contains an unsafe entry {member.name!r}; delete it and download again")
        tar.extractall(root)
