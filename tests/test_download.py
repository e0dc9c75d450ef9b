"""data.download: fetch a missing dataset from a (local stand-in) source; clear errors offline."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from slowmo_train.config import DataConfig
from slowmo_train.data.cifar10 import load_cifar10
from slowmo_train.data.download import extract_tar, fetch_file, md5sum
from slowmo_train.data.errors import DatasetError
from slowmo_train.scripting import launch_env
from tests.conftest import write_torchvision_cifar


def _cifar_archive(tmp_path: Path) -> Path:
    """A tar.gz shaped like the publisher's archive (cifar-10-batches-py/...), tiny synthetic data."""
    src = write_torchvision_cifar(tmp_path / "src", n_train=50, n_test=20)
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_auto_download_fetches_a_missing_copy(tmp_path, monkeypatch):
    archive = _cifar_archive(tmp_path)
    monkeypatch.setenv("SLOWMO_TRAIN_CIFAR10_URL", archive.as_uri())
    monkeypatch.setenv("SLOWMO_TRAIN_CIFAR10_MD5", md5sum(archive))
    root = tmp_path / "data" / "cifar10"
    train = load_cifar10(str(root), train=True, download=True)
    test = load_cifar10(str(root), train=False, download=True)
    assert len(train) == 50 and len(test) == 20
    assert (root / "cifar-10-batches-py" / "data_batch_1").exists()
    assert not list(root.glob("*.tar.gz")) and not list(root.glob(".*part*"))  # archive and partials removed


def test_an_existing_copy_is_used_without_fetching(tmp_path, monkeypatch):
    root = write_torchvision_cifar(tmp_path / "have", n_train=50, n_test=20)
    monkeypatch.setenv("SLOWMO_TRAIN_CIFAR10_URL", "http://127.0.0.1:9/unreachable.tar.gz")
    assert len(load_cifar10(str(root), train=True, download=True)) == 50


def test_offline_error_says_what_to_point_data_root_at(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOWMO_TRAIN_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match="Point data.root at a local copy of CIFAR-10"):
        load_cifar10(str(tmp_path / "nothing"), train=True, download=True)
    assert not list((tmp_path / "nothing").glob(".*part*"))


def test_checksum_mismatch_keeps_nothing(tmp_path):
    archive = _cifar_archive(tmp_path)
    dest = tmp_path / "out" / "a.tar.gz"
    with pytest.raises(DatasetError, match="corrupt"):
        fetch_file(archive.as_uri(), dest, md5="0" * 32, what="CIFAR-10")
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_unsafe_archive_members_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DatasetError, match="unsafe"):
        extract_tar(evil, tmp_path / "x")
    assert not (tmp_path / "escape.txt").exists()


def test_download_accepts_yaml_booleans():
    from slowmo_train.config import download_mode

    assert download_mode(DataConfig(download="True")) == "true"
    assert download_mode(DataConfig(download="auto")) == "auto"


@pytest.mark.multiproc
def test_quickstart_needs_no_data_root(tmp_path):
    """The README's two commands: with no data.root, the quickstart fetches CIFAR-10 into data/cifar10."""
    archive = _cifar_archive(tmp_path)
    env = launch_env()
    env.update(
        SLOWMO_TRAIN_CIFAR10_URL=archive.as_uri(),
        SLOWMO_TRAIN_CIFAR10_MD5=md5sum(archive),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    work = tmp_path / "fresh"
    work.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "slowmo_train",
            "+exp=quickstart",
            "model.width=0.125",
            "train.batch_size=8",
            "train.max_steps=2",
            "train.eval_batch_size=20",
            "launcher.threads_per_worker=1",
            "output_dir=run",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (work / "data" / "cifar10" / "cifar-10-batches-py" / "test_batch").exists()
    assert (work / "run" / "summary.json").exists()
