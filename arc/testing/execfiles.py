"""The file system of an emulated pod: what ``kubectl cp`` reads and writes.

Each pod has a small in-memory tree (L{PodFiles}): directories and regular
files, starting with ``/``, ``/tmp`` and ``/etc/hostname``.  ``kubectl cp``
runs ``tar`` in the pod through exec, so the tree can pack paths into a tar
archive and unpack one, with Python's C{tarfile}.  Messages follow
busybox's wording, as in the ``busybox`` images the emulated pods name.
"""

import io
import posixpath
import tarfile


class FileError(Exception):
    """A path that cannot be used; the message is what the command prints."""


class PodFiles:
    """Directories and files of one pod, by absolute path.

    @param hostname: the content of ``/etc/hostname`` (the pod's name).
    """

    def __init__(self, hostname):
        self._dirs = {"/", "/tmp", "/etc"}
        self._files = {"/etc/hostname": hostname.encode("utf-8") + b"\n"}

    @staticmethod
    def resolve(path, cwd="/"):
        """C{path} as a normalized absolute path, relative ones from C{cwd}."""
        return posixpath.normpath(posixpath.join(cwd, path)).replace("//", "/")

    def isDir(self, path):
        return self.resolve(path) in self._dirs

    def isFile(self, path):
        return self.resolve(path) in self._files

    def read(self, path):
        """The content of a regular file.

        @raise FileError: when there is none at C{path}.
        """
        resolved = self.resolve(path)
        if resolved in self._dirs:
            raise FileError("read error: Is a directory")
        if resolved not in self._files:
            raise FileError(f"can't open '{path}': No such file or directory")
        return self._files[resolved]

    def write(self, path, content):
        """Create or replace a file, and any missing parent directories."""
        resolved = self.resolve(path)
        self._makeDirs(posixpath.dirname(resolved))
        self._files[resolved] = content

    def _makeDirs(self, path):
        while path not in self._dirs:
            self._dirs.add(path)
            path = posixpath.dirname(path)

    def pack(self, paths):
        """A tar archive of C{paths} (directories with their contents).

        Member names lose their leading ``/``, as ``tar cf - /tmp/f`` names
        the member ``tmp/f``.

        @return: C{(archive, errors)}: the archive bytes and a message for
            each path that does not exist.
        """
        buffer, errors = io.BytesIO(), []
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
            for path in paths:
                resolved = self.resolve(path)
                if resolved not in self._dirs and resolved not in self._files:
                    errors.append(f"can't open '{path}': No such file or directory")
                    continue
                for member in self._tree(resolved):
                    self._add(archive, member)
        return buffer.getvalue(), errors

    def _tree(self, root):
        """C{root} and, for a directory, every path below it, parents first."""
        below = root.rstrip("/") + "/"
        inside = [p for p in self._dirs | set(self._files) if p.startswith(below)]
        return [root] + sorted(inside)

    def _add(self, archive, path):
        info = tarfile.TarInfo(path.lstrip("/") or ".")
        info.mode = 0o755 if path in self._dirs else 0o644
        if path in self._dirs:
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        else:
            content = self._files[path]
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))

    def unpack(self, archive, directory):
        """Store the directories and regular files of a tar archive below C{directory}.

        @raise FileError: when C{directory} is missing or the archive
            cannot be read.
        """
        target = self.resolve(directory)
        if target not in self._dirs:
            raise FileError(f"can't change directory to '{directory}': No such file or directory")
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as members:
                for member in members:
                    path = self.resolve(member.name, target)
                    if member.isdir():
                        self._makeDirs(path)
                    elif member.isfile():
                        self.write(path, members.extractfile(member).read())
        except tarfile.TarError as e:
            raise FileError(f"invalid tar archive: {e}") from None
