"""Atomic file writes: a reader never sees a half-written file.

Each write goes to a temporary name beside its target, is flushed to disk (``fsync`` of the
file, or of every file of a folder), renamed into place, and the parent folder is synced so
the rename itself survives a crash. What appears gets the permissions the umask gives a new
file or folder (``tempfile`` would leave 0600 / 0700).

Also here, because data and model loading both need it before they touch the network: whether
the Hugging Face hub is reachable at all (:func:`hub_unreachable`), so that a machine without a
network hears so in one line at once instead of after half a minute of retries.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml


class OutputError(RuntimeError):
    """An output path that cannot be written (a file where a folder goes, not writable, the
    input itself); the message names it."""


def check_output_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a folder to write into, checked before any work: not a file, not a dangling
    symbolic link, and it (or its nearest existing parent) writable. ``what`` names the option."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what} {path}: a dangling symbolic link")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: a file, not a folder")
    _check_writable(path, what)
    return path


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a file to write (replaced atomically), checked before any work: not a folder,
    its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: a folder, not a file")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what} {path}: a dangling symbolic link")
    _check_writable(path.parent, what)
    return path


def _check_writable(path: Path, what: str) -> None:
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise OutputError(f"{what} {path}: {probe} is a dangling symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {probe} is not writable")


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (folders: where the OS allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """``fsync`` every file and folder under ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _chmod_tree(root: Path, mask: int) -> None:
    """Files 0666 and folders 0777, less ``mask``, under ``root`` (``root`` included)."""
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, sync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync_path(Path(tmp))
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_replace_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Build a folder under a temporary name, sync it, then swap it in for ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        _chmod_tree(tmp, current_umask())
        _sync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def append_line(path: Path, line: str) -> None:
    """Append one line (``line`` without its newline) with a single write, then flush and
    sync it: after a crash or a full disk the file ends in a whole line or a torn one, never
    in two lines run together."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    # O_NOFOLLOW: a symbolic link planted under the name never has its target written to.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: only {written} of {len(data)} bytes written (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_torn_tail(path: Path) -> int:
    """Cut a last line without its newline off ``path`` (what a crash or a full disk leaves
    mid-append); returns the bytes removed (0: the file ends in a whole line, or is absent)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Find the last newline, reading backwards in blocks.
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


# --- YAML, read safely ------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a name, not a {type(key).__name__}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _bounded_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    """An integer, or a YAML error at its line when it has more digits than Python converts."""
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(node.value):,} digits is too long", node.start_mark
        ) from None


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


MAX_YAML_NODES = 100_000  # values a YAML document may expand to (aliases counted each time they are used)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many values ``node`` stands for once every alias is expanded (stops past ``limit``);
    a node that contains itself (a recursive alias) counts as beyond any limit."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in active:
            return limit + 1  # a cycle
        active.add(id(n))
        total = 1
        children = (
            n.value
            if isinstance(n, yaml.SequenceNode)
            else [c for pair in n.value for c in pair]
            if isinstance(n, yaml.MappingNode)
            else []
        )
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys (no ``!!python`` tags either), and a
    document that expands to more than :data:`MAX_YAML_NODES` values or refers to itself (an
    alias "bomb" or loop) before constructing it."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"expands to more than {MAX_YAML_NODES:,} values through aliases, or an alias refers "
                "to itself (a YAML alias bomb or loop)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error's problem in one line."""
    return str(getattr(e, "problem", None) or e).replace("\n", " ").strip()


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """Whether the user put the Hugging Face libraries in offline mode (``HF_HUB_OFFLINE=1`` and
    kin): they then read their caches and never touch the network."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off") for v in _OFFLINE_VARIABLES)


@functools.lru_cache(maxsize=4)
def _probe(host: str, port: int, timeout: float) -> str | None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host} cannot be reached: {err.strerror or type(err).__name__}"
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the hub (``$HF_ENDPOINT``, else huggingface.co) accepts a connection within
    ``timeout`` seconds, or when offline mode is on; otherwise why not, in a few words. One probe
    per process and endpoint: a TCP connection, no request."""
    if hub_offline():
        return None
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")
    if not url.hostname:
        return f"HF_ENDPOINT={url.geturl()!r} names no host"
    return _probe(url.hostname, url.port or (80 if url.scheme == "http" else 443), timeout)
