"""What every command checks before it writes: outputs apart from inputs, written whole or not at all.

- `refuse_overlap`: an output path that is, contains or lies inside one of the command's input
  paths (symlinks resolved, real paths compared) is refused before anything is removed or written.
- `staged`: a local output is written into a hidden sibling (`.NAME.partial/NAME`) and renamed onto
  its path only when the whole write succeeded; a crash (or Ctrl-C) leaves the old output, or no
  output, and the next run starts over without --overwrite. URLs are written in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping

from jaxem.data.volume import is_local, local_path, stored, unwritable
from jaxem.errors import UserError

PARTIAL_SUFFIX = ".partial"


def real_path(path: str | os.PathLike) -> str:
    """The canonical form of `path` for comparisons: the real absolute path (symlinks resolved) of
    a local path or file:// URL, the URL without trailing slashes otherwise."""
    path = str(path)
    if is_local(path):
        return os.path.realpath(local_path(path))
    return path.rstrip("/")


def _relation(output: str, other: str) -> str | None:
    if output == other:
        return "the same path as"
    sep = os.sep if output.startswith(os.sep) else "/"
    if output.startswith(other.rstrip(sep) + sep):
        return "inside"
    if other.startswith(output.rstrip(sep) + sep):
        return "a folder holding"
    return None


def refuse_overlap(output_flag: str, output: str | os.PathLike,
                   inputs: Mapping[str, str | os.PathLike | None] | Iterable[tuple[str, str | os.PathLike]],
                   holding_ok: bool = False) -> None:
    """UserError when `output` is, contains or lies inside one of `inputs` ({flag: path} or (flag,
    path) pairs; None paths are skipped); call it before anything is written or removed.
    holding_ok: an output folder may hold inputs (a workdir with its data/ beside checkpoints)."""
    mine = real_path(output)
    for flag, path in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        if path is None or str(path) == "":
            continue
        relation = _relation(mine, real_path(path))
        if relation is not None and not (holding_ok and relation == "a folder holding"):
            raise UserError(f"{output_flag} {output} is {relation} {flag} {path}; jaxem never writes over its inputs, "
                            "so choose an output path outside them.")


def volume_fields(section) -> list[tuple[str, str]]:
    """(config field, path) of every volume a config section names in its `*_images`, `*_labels`
    and `*_masks` fields (e.g. config.data), for `refuse_overlap`."""
    pairs = []
    for key, value in section.items():
        if key.endswith(("_images", "_labels", "_masks")) and value:
            pairs += [(key, str(v)) for v in ((value,) if isinstance(value, str) else value)]
    return pairs


@contextlib.contextmanager
def staged(path: str | os.PathLike, overwrite: bool, flag: str = "output") -> Iterator[str]:
    """Yields where to write the output `path`: a local output goes to `.NAME.partial/NAME` beside
    it and replaces `path` only when the block finishes without an exception (an existing `path`
    is refused unless `overwrite`); a URL is yielded as it is and written in place."""
    path = str(path)
    if not is_local(path):
        yield path
        return
    final = local_path(path).rstrip(os.sep) or os.sep
    if stored(final) and not overwrite:
        raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it.")
    parent, name = os.path.split(os.path.abspath(final))
    holder = os.path.join(parent, f".{name}{PARTIAL_SUFFIX}")
    try:
        shutil.rmtree(holder, ignore_errors=True)  # what a killed run left
        os.makedirs(holder)
    except OSError as e:
        raise unwritable(path, e) from None
    try:
        yield os.path.join(holder, name)
        _replace(os.path.join(holder, name), final)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _replace(new: str, final: str) -> None:
    try:
        if os.path.isdir(final) and not os.path.islink(final):
            shutil.rmtree(final)
        elif os.path.lexists(final):
            os.remove(final)
        os.rename(new, final)
    except OSError as e:
        raise unwritable(final, e) from None
