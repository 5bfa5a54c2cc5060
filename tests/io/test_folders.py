"""Folders written whole (qwen2np/io/folders.py), and the writer that uses it for checkpoints:
save_hf_folder's rules for a folder that already holds files."""

import errno
import json
import os
import stat

import numpy as np
import pytest

from qwen2np.errors import CheckpointError, OutputExistsError
from qwen2np.io import folders
from qwen2np.io.hf_folder import save_hf_folder
from qwen2np.weights.store import load_checkpoint
from qwen2np.io.folders import check_target, write_folder


def _tree(folder):
    """{relative path: text} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _siblings(folder):
    """What else is in the parent folder: temporary or set-aside folders left behind would show here."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.fixture
def old(tmp_path):
    folder = tmp_path / "parent" / "out"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("old a")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("old b")
    return folder


def test_writes_a_new_folder_with_its_parents(tmp_path):
    target = tmp_path / "x" / "y" / "out"
    with write_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.tmp-") and not any(tmp.iterdir())
        (tmp / "f.txt").write_text("new")
    assert _tree(target) == {"f.txt": "new"} and _siblings(target) == []


def test_an_empty_folder_is_replaced_and_keeps_its_mode(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    os.chmod(target, 0o750)
    with write_folder(target) as tmp:
        (tmp / "f.txt").write_text("new")
    assert _tree(target) == {"f.txt": "new"} and stat.S_IMODE(target.stat().st_mode) == 0o750
    assert _siblings(target) == []


def test_a_folder_that_holds_files_is_refused_unless_overwrite(old):
    before = _tree(old)
    with pytest.raises(OutputExistsError, match=r"out: the folder holds files \(a.txt, sub\); pass overwrite=True"):
        with write_folder(old):
            pytest.fail("the block must not run")
    assert isinstance(OutputExistsError("x"), FileExistsError)
    assert _tree(old) == before and _siblings(old) == []
    with write_folder(old, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(old) == {"new.txt": "new"} and _siblings(old) == []  # replaced whole: no old file survives


def test_a_file_is_never_replaced(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="expected a folder to write into, found a file"):
            with write_folder(target, overwrite=overwrite):
                pass
    assert target.read_text() == "a file" and _siblings(target) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")])
def test_a_failure_while_writing_leaves_the_old_folder(old, error):
    before = _tree(old)
    with pytest.raises(type(error)):
        with write_folder(old, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise error
    assert _tree(old) == before and _siblings(old) == []
    fresh = old.parent / "fresh"
    with pytest.raises(type(error)):
        with write_folder(fresh) as tmp:
            raise error
    assert not fresh.exists() and _siblings(old) == []


def test_the_swap_is_one_atomic_exchange_where_linux_has_it(old, monkeypatch):
    if folders._renameat2() is None:
        pytest.skip("no renameat2 in this C library: the two-rename swap is tested below")
    calls = []
    real = folders._exchange
    monkeypatch.setattr(folders, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    monkeypatch.setattr(folders.os, "rename", lambda *a: pytest.fail("no plain rename when exchanging"))
    with write_folder(old, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert calls == [True] and _tree(old) == {"new.txt": "new"} and _siblings(old) == []


def test_the_two_rename_swap_puts_the_old_folder_back_when_it_fails(old, monkeypatch):
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)  # as on a system without renameat2
    with write_folder(old, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(old) == {"new.txt": "new"} and _siblings(old) == []

    before = _tree(old)
    real_rename = os.rename

    def failing_second_rename(source, destination):
        if ".tmp-" in str(source):  # the new folder moving in
            raise OSError(errno.EIO, "Input/output error")
        real_rename(source, destination)

    monkeypatch.setattr(folders.os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="Input/output error"):
        with write_folder(old, overwrite=True) as tmp:
            (tmp / "other.txt").write_text("other")
    assert _tree(old) == before and _siblings(old) == []


def test_files_that_appear_while_writing_are_not_overwritten(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="holds files"):
        with write_folder(target) as tmp:
            (tmp / "mine.txt").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")  # another writer got there first
    assert _tree(target) == {"theirs.txt": "theirs"} and _siblings(target) == []


def test_a_link_to_a_folder_stays_a_link(old, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(old, target_is_directory=True)
    with write_folder(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and _tree(old) == {"new.txt": "new"} and _siblings(old) == []
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="a broken symbolic link"):
        check_target(broken)


def test_keep_carries_chosen_entries_over_by_hard_link(old):
    inode = (old / "a.txt").stat().st_ino
    (old / "c.txt").write_text("old c")
    with write_folder(old, overwrite=True, keep=lambda name: name != "c.txt") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("the writer's sub wins")
    assert _tree(old) == {"a.txt": "old a", "sub/new.txt": "the writer's sub wins"}
    assert (old / "a.txt").stat().st_ino == inode  # a link, not a copy
    with write_folder(old, overwrite=True, keep=lambda name: True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert _tree(old) == {"a.txt": "old a", "sub/new.txt": "the writer's sub wins", "b.txt": "b"}


def test_the_root_the_current_folder_and_paths_under_a_file_are_refused(tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for target in (".", "..", tmp_path / "a", "/"):
        with pytest.raises(OutputExistsError, match="the root or the current folder .* is never replaced"):
            with write_folder(target, overwrite=True):
                pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match=f"cannot write it, {tmp_path / 'f'} is a file, not a folder"):
        check_target(tmp_path / "f" / "x" / "y")
    with write_folder("sub/.", overwrite=False) as tmp:  # the folder's own name, not "."
        assert tmp.parent == inner
    assert (inner / "sub").is_dir() and _siblings(inner / "sub") == []


def test_os_errors_name_the_target_and_leave_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out"

    def no_permission(path, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(folders.os, "mkdir", no_permission)
    with pytest.raises(PermissionError, match=f"cannot write {target}: Permission denied"):
        with write_folder(target):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_inside_names_the_target_not_the_temporary_folder(old, tmp_path):
    """A full disk while writing the files said only "No space left on device" (a write to an open file names
    no path), and an error on a file named the hidden temporary folder; both now name what was being written.
    An error about another file is left as it was."""
    before = _tree(old)
    with pytest.raises(OSError) as e:
        with write_folder(old, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.strerror == f"cannot write {old}: No space left on device"
    assert e.value.errno == errno.ENOSPC and e.value.filename is None
    with pytest.raises(PermissionError) as e:
        with write_folder(old, overwrite=True) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "sub" / "b.txt"))
    assert e.value.strerror == f"cannot write {old / 'sub' / 'b.txt'}: Permission denied"
    elsewhere = tmp_path / "source.gguf"
    with pytest.raises(OSError) as e:
        with write_folder(old, overwrite=True):
            raise OSError(errno.EIO, "Input/output error", str(elsewhere))
    assert e.value.filename == str(elsewhere) and "cannot write" not in str(e.value)
    with pytest.raises(OSError) as e:   # not a write error: left as it was
        with write_folder(old, overwrite=True):
            raise OSError(errno.EPIPE, "Broken pipe")
    assert str(e.value) == "[Errno 32] Broken pipe"
    assert _tree(old) == before and _siblings(old) == []


# -- save_hf_folder ------------------------------------------------------------------------------------

CONFIG = {"model_type": "qwen2", "hidden_size": 4}


def _tensors(scale=1.0):
    return {"model.norm.weight": np.full(4, scale, np.float32), "lm_head.weight": np.full((3, 4), scale, np.float32)}


def test_resaving_a_model_replaces_its_files_and_keeps_the_tokenizer(tmp_path):
    folder = tmp_path / "model"
    save_hf_folder(folder, CONFIG, _tensors(), generation_config={"eos_token_id": 3}, max_shard_bytes=20)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("notes")
    save_hf_folder(folder, {**CONFIG, "hidden_size": 4, "v": 2}, _tensors(2.0))  # one file, no generation config
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json"]  # no stale shard or generation config
    ckpt = load_checkpoint(folder)
    assert ckpt.config["v"] == 2 and ckpt.generation_config is None
    np.testing.assert_array_equal(ckpt.tensors["model.norm.weight"], np.full(4, 2.0, np.float32))
    assert (folder / "tokenizer.json").read_text() == "{}" and _siblings(folder) == []


def test_a_model_saved_after_its_tokenizer_keeps_it(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text("{}")
    save_hf_folder(folder, CONFIG, _tensors())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                        "special_tokens_map.json", "tokenizer_config.json",
                                                        "vocab.json"]


def test_a_folder_that_is_not_a_model_folder_is_refused(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("print('hi')")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"holds files that are not a Hugging Face model folder's \(train.py\)"):
        save_hf_folder(folder, CONFIG, _tensors())
    assert _tree(folder) == {"train.py": "print('hi')", "tokenizer.json": "{}"} and _siblings(folder) == []
    save_hf_folder(folder, CONFIG, _tensors(), overwrite=True)  # replaced whole, nothing kept
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        save_hf_folder(folder, CONFIG, _tensors(), overwrite=False)
    with pytest.raises(CheckpointError, match="overwrite must be None, True or False"):
        save_hf_folder(folder, CONFIG, _tensors(), overwrite="yes")


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    from qwen2np.io import hf_folder

    folder = tmp_path / "model"
    save_hf_folder(folder, CONFIG, _tensors())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    written = []

    def disk_fills_up(path, tensors, dtype=None):  # the second shard does not fit
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real_write(path, tensors, dtype=dtype)

    real_write = hf_folder.write_safetensors
    monkeypatch.setattr(hf_folder, "write_safetensors", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        save_hf_folder(folder, {**CONFIG, "v": 3}, _tensors(2.0), max_shard_bytes=20)
    assert len(written) == 1  # config.json and a shard were written, in the temporary folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and _siblings(folder) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(config=[1]), "config must be a dict, found list"),
    (dict(config={"a": {1, 2}}), "config cannot be written as JSON: Object of type set"),
    (dict(generation_config={"x": object()}), "generation_config cannot be written as JSON"),
    (dict(tensors=[np.ones(2)]), "tensors must be a dict"),
    (dict(tensors={3: np.ones(2, np.float32)}), "tensor names must be strings, found 3"),
    (dict(tensors={"w": [1.0, 2.0]}), "tensor 'w' must be an array, found list"),
    (dict(tensors={"w": np.array([None])}), "tensor 'w' has dtype object, which cannot be written as it is"),
    (dict(tensors={"w": np.array([None])}, dtype="float32"), "tensor 'w' has dtype object, which cannot be written as float32"),
    (dict(tensors={"w": np.ones(2, np.int32)}), "tensor 'w' has dtype int32"),
    (dict(max_shard_bytes=0), "max_shard_bytes must be None or an integer >= 1, found 0"),
    (dict(max_shard_bytes="1GB"), "max_shard_bytes must be None or an integer >= 1, found '1GB'"),
])
def test_what_cannot_be_saved_is_refused_before_anything_is_written(tmp_path, kwargs, message):
    kwargs = {"config": CONFIG, "tensors": _tensors(), **kwargs}
    with pytest.raises(CheckpointError, match=message):
        save_hf_folder(tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_passes_overwrite_on(tmp_path):
    from qwen2np import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1), seed=0)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # re-saving into its own folder is allowed
    with pytest.raises(OutputExistsError):
        model.save_pretrained(folder, overwrite=False)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
