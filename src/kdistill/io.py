"""Files in and out of a run: atomic writes, bounded and checked reads, and the run directory.

Writing: every file kdistill writes into a run directory (checkpoints, stage markers, models,
the teacher cache's manifest, reports, a method's artefacts) goes through `atomic_write`:
written under a fresh temporary name beside the target (created with O_EXCL | O_NOFOLLOW, so a
link planted under that name is never followed), flushed to disk, then renamed over the target.
A rename replaces a symbolic link at the target itself, it never writes through it. A failed
write is one `TrainingError` naming the file; the temporary file is removed and the old file
(if any) left as it was.

Reading: `read_json` and `read_yaml` turn a missing, unreadable, oversized, undecodable,
malformed or wrongly typed file into one `ConfigError` naming the file and what was expected.
`read_yaml` also bounds the document *after* alias expansion (a "billion laughs" file of a few
hundred bytes stands for billions of nodes) before any Python object is built.

The run directory: `RunDirectory.open(output_dir, name)` checks that the run's name is one
directory inside `output_dir`, takes a lock on it (one run per directory at a time) and hands
out paths inside it that do not pass through a symbolic link (see docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

from kdistill.errors import ConfigError, TrainingError

YAML_MAX_BYTES = 1 << 20  # a recipe is < 40 lines; 1 MiB leaves room for long lists
YAML_MAX_NODES = 100_000  # values after alias expansion; a recipe has about a hundred
YAML_MAX_DEPTH = 64  # nesting; a recipe is about 5 deep
JSON_MAX_BYTES = 256 << 20  # run files (eval.json, manifests, state) are kilobytes
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# ---------------------------------------------------------------------------- writing


def write_failed(path: Path, exc: OSError, intact: str) -> TrainingError:
    """A failed write (disk full, permissions) as one line naming the file that was written."""
    return TrainingError(f"{path}: write failed ({_reason(path, exc)}); {intact}")


def _reason(path: Path, exc: OSError) -> str:
    """Why creating or writing `path` failed, naming a file that sits where a directory is
    expected rather than saying "File exists" or "Not a directory"."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        for parent in [*reversed(Path(path).parents), Path(path)]:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a directory"
    return str(exc.strerror or exc)


def _remove(path: Path) -> None:
    # Best effort: the temp file is the least of the user's problems when the disk is full.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def make_dirs(path: Path, *, where: str | None = None) -> Path:
    """`mkdir -p path`; a file in the way, no permission or a read-only disk is one
    ConfigError naming `where` (default: the path) and the reason."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(where or str(path), f"cannot create directory {path} "
                          f"({_reason(path, exc)})") from None
    return path


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then rename over `path`: a crash or a full disk never leaves a torn file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created here, exclusively: `write` then opens an existing regular file of ours.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
        write(tmp)
        fsync_file(tmp)  # the data is on disk before the new name is (never published zeros)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise write_failed(path, exc, "the file as it was before is unchanged") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_model_atomic(model: nn.Module, path: Path) -> None:
    """safetensors file written to a temp name, then renamed over `path`."""
    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def save_tensors_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    """A dict of tensors as a safetensors file, written to a temp name, then renamed."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                        str(tmp)))


def file_digest(path: Path, *, chunk: int = 4 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (about 0.8 GiB/s on one core of the 2-vCPU
    test VMs): the checksum the teacher cache and checkpoints carry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- reading

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true or false", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""


def read_text(path: Path, *, what: str = "file", hint: str = "",
              max_bytes: int = JSON_MAX_BYTES) -> str:
    """A UTF-8 text file; missing, unreadable, too large or undecodable is one ConfigError
    naming the file, the byte offset of the first bad byte, and `hint` (what to do)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ConfigError(str(path), f"{what} not found{_tail(hint)}") from None
    except IsADirectoryError:
        raise ConfigError(str(path), f"is a directory, expected {what}{_tail(hint)}") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read {what} ({_reason(path, exc)})"
                          f"{_tail(hint)}") from None
    if len(data) > max_bytes:
        raise ConfigError(str(path), f"{what} is over {max_bytes:,} bytes; that is not a file "
                          f"kdistill wrote or expects{_tail(hint)}")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                          f"at offset {exc.start}){_tail(hint)}") from None


def read_json(path: Path, *, expect: type | tuple[type, ...] = dict, what: str = "file",
              hint: str = "", max_bytes: int = JSON_MAX_BYTES) -> Any:
    """A JSON file whose top-level value is of type `expect` (dict: a JSON object).

    Undecodable bytes, invalid JSON and a wrong type (`null`, `[]` for an object) are one
    ConfigError naming the file, `what` it should be and `hint` (what to do about it)."""
    text = read_text(path, what=what, hint=hint, max_bytes=max_bytes)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                          f"column {exc.colno}){_tail(hint)}") from None
    except RecursionError:
        raise ConfigError(str(path), f"{what} is nested too deeply{_tail(hint)}") from None
    expected = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        names = " or ".join(dict.fromkeys(_JSON_TYPES.get(t, t.__name__) for t in expected))
        raise ConfigError(str(path), f"{what} should be {names}, got {_json_type(value)}"
                          f"{_tail(hint)}")
    return value


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no tags, no code) that sizes the composed document, aliases
    expanded, before constructing any Python object from it."""

    max_nodes = YAML_MAX_NODES
    max_depth = YAML_MAX_DEPTH

    def construct_document(self, node: yaml.Node) -> Any:
        _check_size(node, self.max_nodes, self.max_depth)
        return super().construct_document(node)


class _YamlTooLarge(Exception):
    pass


def _check_size(root: yaml.Node, max_nodes: int, max_depth: int) -> None:
    """Raise _YamlTooLarge when the document, each alias counted as a copy of its anchor,
    has more than `max_nodes` nodes, is deeper than `max_depth` or refers to itself."""
    memo: dict[int, tuple[int, int]] = {}  # node id -> (expanded size, height)
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise _YamlTooLarge("an anchor refers to itself (a recursive YAML document)")
        if key not in memo:
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            if depth + 1 > max_depth and children:
                raise _YamlTooLarge(f"the YAML is nested more than {max_depth} levels deep")
            active.add(key)
            total, height = 1, 0
            for child in children:
                n, h = size(child, depth + 1)
                total, height = total + n, max(height, h + 1)
                if total > max_nodes:
                    break
            active.discard(key)
            memo[key] = (total, height)
        total, height = memo[key]
        if total > max_nodes:
            raise _YamlTooLarge(f"the YAML holds over {max_nodes:,} values once its aliases "
                                "are expanded (an alias bomb?)")
        if depth + height > max_depth:
            raise _YamlTooLarge(f"the YAML is nested more than {max_depth} levels deep")
        return total, height

    size(root, 0)


def _parse_yaml(text: str, where: str, max_nodes: int, max_depth: int) -> Any:
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks for unprintable characters first
        loader.max_nodes, loader.max_depth = max_nodes, max_depth
        return loader.get_single_data()
    except _YamlTooLarge as exc:
        raise ConfigError(where, f"refused: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or type(exc).__name__
        raise ConfigError(where, f"invalid YAML{at}: {problem}") from None
    except yaml.reader.ReaderError as exc:  # a control character or a lone surrogate
        raise ConfigError(where, f"invalid YAML: character #x{exc.character:04x} at character "
                          f"{exc.position}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"invalid YAML: {exc}") from None
    except RecursionError:  # PyYAML composes recursively: deeper than Python's stack
        raise ConfigError(where, "refused: the YAML is nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of 5,000 digits
        raise ConfigError(where, f"invalid YAML value: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path, *, max_bytes: int = YAML_MAX_BYTES, max_nodes: int = YAML_MAX_NODES,
              max_depth: int = YAML_MAX_DEPTH, what: str = "recipe") -> Any:
    """A YAML file as plain Python data (`yaml.SafeLoader`: no tags, no code), bounded.

    Refused, as one ConfigError naming the file: over `max_bytes`; not UTF-8 (with the byte
    offset); invalid YAML (with line and column); more than `max_nodes` values once aliases
    are expanded, deeper than `max_depth`, or recursive -- checked on the composed node graph,
    before any Python object is constructed."""
    text = read_text(path, what=what, max_bytes=max_bytes,
                     hint="save it as UTF-8" if what == "recipe" else "")
    return _parse_yaml(text, str(path), max_nodes, max_depth)


def parse_yaml_value(text: str, *, where: str = "override", max_bytes: int = YAML_MAX_BYTES,
                     max_nodes: int = YAML_MAX_NODES, max_depth: int = YAML_MAX_DEPTH) -> Any:
    """The value of a `key=value` override, parsed and bounded like `read_yaml`."""
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ConfigError(where, f"value is over {max_bytes:,} bytes")
    return _parse_yaml(text, where, max_nodes, max_depth)


# ---------------------------------------------------------------------------- run directory


def refuse_symlink(path: Path, what: str = "path") -> None:
    """ConfigError if `path` is a symbolic link: kdistill never writes through a link inside a
    run directory (it could point anywhere)."""
    if Path(path).is_symlink():
        raise ConfigError(str(path), f"{what} is a symbolic link; kdistill does not read or write "
                          "through links inside a run directory (it could point outside it): "
                          "remove the link")
