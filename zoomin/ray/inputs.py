"""What `zoomin batch INPUT` means: a folder, a glob, a `.txt` list of paths/URIs, or one image; local or a URI.

Local paths come back absolute (workers on other nodes do not share the driver's working directory); URIs come back
as URIs. The result is sorted and free of duplicates, and each entry is the key `zoomin batch` resumes by.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

from zoomin.runtime.image_io import IMAGE_SUFFIXES

from .predictor import is_uri

LIST_SUFFIX = ".txt"
_GLOB_CHARS = "*?["


def list_inputs(spec: str) -> list[str]:
    """Image paths/URIs named by `spec`.

    - a folder: its image files (by suffix, IMAGE_SUFFIXES), recursively;
    - a glob (`*`, `?`, `[`; `**` recurses): the files it matches, whatever their suffix;
    - a file ending in `.txt`: one path or URI per line (blank lines and `#` comments skipped; relative local
      paths are taken from the current directory);
    - any other file: that one image.
    """
    if is_uri(spec):
        return sorted(set(_list_uri(spec)))
    if any(c in spec for c in _GLOB_CHARS):
        found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(spec):
        from zoomin.cli import collect_images

        found = [str(p) for p in collect_images((Path(spec),))]
    elif spec.endswith(LIST_SUFFIX) and os.path.isfile(spec):
        return sorted(set(_read_list(spec)))
    else:
        found = [spec]  # a missing file becomes its own error row
    return sorted({os.path.abspath(p) for p in found})


def _read_list(list_file: str) -> list[str]:
    out = []
    for line in Path(list_file).read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append(entry if is_uri(entry) else os.path.abspath(entry))
    return out


def _list_uri(spec: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme = spec.split("://", 1)[0] + "://"
    fs, path = pafs.FileSystem.from_uri(spec)
    if spec.endswith(LIST_SUFFIX) and not any(c in path for c in _GLOB_CHARS):
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
        return [e.strip() for e in text.splitlines() if e.strip() and not e.strip().startswith("#")]
    pattern = path if any(c in path for c in _GLOB_CHARS) else None
    base = path if pattern is None else path[:min(path.find(c) for c in _GLOB_CHARS if c in path)].rpartition("/")[0]
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [scheme + path]
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = [e.path for e in entries if e.type == pafs.FileType.File]
    if pattern is None:
        files = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    else:  # fnmatch's `*` also crosses `/`, so `**` and `*` both recurse here
        files = [f for f in files if fnmatch.fnmatchcase(f, pattern)]
    return [scheme + f for f in files]
