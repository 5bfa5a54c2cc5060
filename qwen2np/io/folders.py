"""Writing a folder whole: a reader sees the old folder or the new one, never a mix of the two.

`qwen2np convert`, `save_hf_folder` (and so `model.save_pretrained`) and the dump writers all write
through `write_folder`:

    with write_folder("out", overwrite=True) as tmp:   # tmp: a fresh, empty sibling ".out.tmp-…"
        ...write every file into tmp...
    # "out" is now the new folder. An exception (or Ctrl-C) inside the block removes tmp and leaves
    # "out" exactly as it was.

The rules:

* The target may be absent or an empty folder. A folder that holds anything is refused with an
  `OutputExistsError` (a `FileExistsError`) unless `overwrite=True`; a file, or anything that is not a
  folder, at the target is always refused. The check happens on entry, before any slow work, and
  again at the swap.
* The new folder is written under a temporary name in the same parent folder, so that every rename
  below stays on one filesystem and is atomic. Missing parents are created.
* The swap. An absent or empty target is replaced by one `rename` (atomic). A target that holds files
  (`overwrite=True`) is swapped with the new folder by `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15,
  glibc >= 2.28, called through ctypes): one atomic step, after which the old tree, now under the
  temporary name, is removed. Where that call is missing or the filesystem refuses it, the old folder
  is renamed aside (".out.old-…"), the new one renamed in, and the old one removed; a crash between
  those two renames leaves no "out" for that instant, with the old folder intact under ".out.old-…".
  If the second rename fails, the old folder is renamed back.
* `keep(name)`, when given, names entries of the old folder to carry into the new one (hard links,
  or copies where links are not possible) unless the writer wrote the same name: `save_hf_folder`
  uses it to replace a model's files and keep the tokenizer files beside them.
* A symbolic link to a folder is followed: the folder it points to is replaced, the link stays.
* A process killed while writing leaves its ".out.tmp-…" sibling behind (hidden, never mistaken for
  the target); nothing removes it automatically, since another process may be writing it.

One writer at a time per target: two processes replacing the same folder at once each leave a whole
folder, the last one wins.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "out"
>>> with write_folder(out) as tmp:
...     _ = (tmp / "a.txt").write_text("one")
>>> sorted(p.name for p in out.iterdir())
['a.txt']
>>> with write_folder(out) as tmp:  # doctest: +ELLIPSIS
...     pass
Traceback (most recent call last):
...
qwen2np.errors.OutputExistsError: .../out: the folder holds files (a.txt); pass overwrite=True (--overwrite on the command line) to replace it
>>> with write_folder(out, overwrite=True) as tmp:
...     _ = (tmp / "b.txt").write_text("two")
>>> sorted(p.name for p in out.iterdir())
['b.txt']
"""

import ctypes
import errno
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from ..errors import OutputExistsError

__all__ = ["write_folder", "check_target"]


def check_target(target, overwrite=False):
    """The folder `write_folder` would replace (absolute, a symbolic link followed), after the checks it
    makes on entry: raises `OutputExistsError` for a file, a broken link, the root or a folder holding the
    current folder (never replaced), or (unless `overwrite`) a folder that holds anything."""
    given = target
    target = Path(os.path.abspath(target))  # "out/", "out/.", "a/../out": the folder's own name
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:  # the first ancestor that exists ...
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # ... must be a folder, or nothing can be created under it
        raise OutputExistsError(f"{given}: cannot write it, {ancestor} is a file, not a folder")
    if target.is_symlink():
        if not target.exists():
            raise OutputExistsError(f"{given}: a broken symbolic link (to {os.readlink(target)}); remove it "
                                    f"or give another folder")
        target = Path(os.path.realpath(target))
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"{given}: expected a folder to write into, found a file")
        try:
            cwd = Path(os.path.realpath(os.getcwd()))
        except OSError:  # the current folder was removed
            cwd = None
        if target.parent == target or (cwd is not None and (cwd == target or target in cwd.parents)):
            raise OutputExistsError(f"{given}: the root or the current folder (or one holding it) is never "
                                    f"replaced; give a folder beside or below it")
        if not overwrite:
            present = _entries(target)
            if present:
                shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
                raise OutputExistsError(f"{given}: the folder holds files ({shown}); pass overwrite=True "
                                        f"(--overwrite on the command line) to replace it")
    return target


@contextmanager
def write_folder(target, overwrite=False, keep=None):
    """Yield a fresh empty folder (a `Path`) to write into; on a clean exit it replaces `target` whole.

    See the module docstring for the rules. An OS error of a write into the folder (a full disk, no
    permission, a read-only filesystem) propagates as an `OSError` of the same errno that names `target`,
    not the temporary folder: "cannot write out: No space left on device" (`_naming`); any error leaves
    the temporary folder removed and `target` untouched.
    """
    target = check_target(target, overwrite)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(target, "tmp")
    try:
        yield tmp
        if target.exists():
            _copy_mode(target, tmp)
            if keep is not None:
                _carry_over(target, tmp, keep)
        _swap_in(tmp, target, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _naming(e, tmp, target)
        if named is e:
            raise
        raise named from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# errors of a write that names no file (a write to an open file): they are the folder's
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _naming(error, tmp, target):
    """`error` as an OSError that names `target` (or the file in it) when it is about writing the temporary
    folder `tmp`: a file in tmp, or a write error that names no file. Any other error is returned as it is
    (one about another file, a refusal such as OutputExistsError)."""
    where = None
    if error.filename is not None:
        name = Path(os.fsdecode(error.filename))
        if name == tmp or tmp in name.parents:
            where = target / name.relative_to(tmp)
    elif error.errno in _WRITE_ERRORS:
        where = target
    if where is None:
        return error
    return OSError(error.errno, f"cannot write {where}: {error.strerror or error}")


def _entries(folder):
    return sorted(os.listdir(folder))


def _fresh_sibling(target, kind):
    """Create (mode 0o777 less the umask, as mkdir gives) an empty hidden sibling of `target`."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except OSError as e:  # say which folder could not be written, not only the temporary name
            raise OSError(e.errno, f"cannot write {target}: {e.strerror}") from None
        return path
    raise OutputExistsError(f"{target}: cannot find a free temporary name beside it")


def _copy_mode(old, new):
    """The new folder keeps the permission bits of the one it replaces (a shared folder stays shared)."""
    try:
        os.chmod(new, stat.S_IMODE(os.stat(old).st_mode))
    except OSError:
        pass


def _carry_over(old, new, keep):
    """Hard-link (or copy) the entries of `old` that `keep(name)` selects and `new` does not have."""
    for name in _entries(old):
        if not keep(name) or os.path.lexists(new / name):
            continue
        source = old / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, new / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, new / name)


def _link_or_copy(source, destination):
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
        return destination
    try:
        os.link(source, destination)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, destination)
    return destination


def _swap_in(tmp, target, overwrite):
    """Put the folder `tmp` at `target` (see the module docstring)."""
    if not target.exists():
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a folder appeared meanwhile
                check_target(target, overwrite)  # raises OutputExistsError unless overwrite
                return _swap_in(tmp, target, overwrite)
            raise
        return None
    check_target(target, overwrite)  # still a folder, and still empty unless overwrite
    if not _entries(target):
        os.rename(tmp, target)  # an empty folder is replaced atomically by rename
        return None
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return None
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return None


@lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2, or None (not Linux, an old glibc, no ctypes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a, b):
    """Swap the names `a` and `b` in one atomic step; False where the system cannot (then nothing moved)."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # a filesystem or kernel without RENAME_EXCHANGE: fall back to two renames
    raise OSError(code, f"cannot replace {b}: {os.strerror(code)}", os.fspath(b))
