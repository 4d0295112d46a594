"""Files of a folder (recursive) or a zip archive, listed in a deterministic order and read as bytes.

A zip handle is opened lazily and re-opened in each process, so a source can be pickled into
DataLoader workers (a zip handle shared across fork is not safe: workers would move one file
position under each other).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from stylenat.errors import DataError, MissingFileError


def _is_hidden(name: str) -> bool:
    """Hidden files and macOS resource forks (".DS_Store", "__MACOSX/._x.jpg") are never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class FileSource:
    """Read-only view of the files under `path`: a directory (walked recursively) or a .zip file.

    path: directory or zip archive. `names` are relative POSIX paths, sorted, hidden files left out.
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
        self.names, self.sizes = self._scan()

    def _scan(self) -> tuple[list[str], dict[str, int]]:
        if self.is_zip:
            infos = [i for i in self._archive().infolist() if not i.is_dir()]
            sizes = {i.filename: i.file_size for i in infos}
        else:
            sizes = {}
            for root, _, files in os.walk(self.path):
                for f in files:
                    full = Path(root) / f
                    sizes[full.relative_to(self.path).as_posix()] = full.stat().st_size
        names = sorted(n for n in sizes if not _is_hidden(n))
        return names, {n: sizes[n] for n in names}

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def read(self, name: str) -> bytes:
        """The bytes of file `name` (one of `names`)."""
        if self.is_zip:
            return self._archive().read(name)
        return (self.path / name).read_bytes()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": None}
