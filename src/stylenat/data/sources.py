"""Files of a folder (recursive) or a zip archive, listed in a deterministic order and read as bytes.

A zip entry whose name points outside the archive's root (absolute, with a drive letter or a ".."
component: a "zip slip") is never one of the files; it is listed apart, so that readers can say
they skipped it instead of dropping it silently.

A zip handle is opened lazily and re-opened in each process, so a source can be pickled into
DataLoader workers (a zip handle shared across fork is not safe: workers would move one file
position under each other).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from stylenat.errors import DataError, MissingFileError

UNSAFE_REASON = "unsafe path in archive (absolute, drive letter or '..')"


def is_unsafe_name(name: str) -> bool:
    """Whether an archive entry's name points outside the archive's root: absolute ("/x"), with a
    drive letter ("C:x") or with a ".." component. Backslashes count as separators, as Windows
    tools that extract the archive would take them."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or re.match(r"[A-Za-z]:", posix) is not None or ".." in posix.split("/")


def _is_hidden(name: str) -> bool:
    """Hidden files and macOS resource forks (".DS_Store", "__MACOSX/._x.jpg") are never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class FileSource:
    """Read-only view of the files under `path`: a directory (walked recursively) or a .zip file.

    path: directory or zip archive. `names` are relative POSIX paths, sorted, hidden files left out.
    `unsafe`: the zip entries left out of `names` because their names escape the archive
    (see is_unsafe_name), sorted; always empty for a directory.
    Raises FileNotFoundError for a missing path and ValueError for a file that is not a zip.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise MissingFileError(f"no such file or folder: {self.path}")
        self.is_zip = self.path.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.path):
            raise DataError(f"{self.path} is neither a folder nor a zip archive")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self.names, self.sizes, self.unsafe = self._scan()

    def _scan(self) -> tuple[list[str], dict[str, int], list[str]]:
        if self.is_zip:
            # "./a.png" (as `zip -r x.zip .` writes) is "a.png": "." is the archive's own folder, not a
            # hidden name or a class folder.
            infos = [i for i in self._archive().infolist() if not i.is_dir()]
            self._entries = {}
            for i in infos:
                self._entries.setdefault("/".join(p for p in i.filename.split("/") if p != "."), i.filename)
            sizes = {name: self._archive().getinfo(entry).file_size for name, entry in self._entries.items()}
        else:
            sizes = {}
            for root, _, files in os.walk(self.path):
                for f in files:
                    full = Path(root) / f
                    sizes[full.relative_to(self.path).as_posix()] = full.stat().st_size
        # Checked before _is_hidden, which takes ".." for a hidden name. A folder's own file names
        # ("C:x.png" is a valid one on Linux) are inside it by construction.
        unsafe = {n for n in sizes if is_unsafe_name(n)} if self.is_zip else set()
        names = sorted(n for n in sizes if not _is_hidden(n) and n not in unsafe)
        return names, {n: sizes[n] for n in names}, sorted(unsafe)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def read(self, name: str) -> bytes:
        """The bytes of file `name` (one of `names`)."""
        if self.is_zip:
            return self._archive().read(self._entries[name])
        return (self.path / name).read_bytes()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": None}
