"""Is a checkpoint step whole and what was saved? File lists with sizes and crc32 (split by process), value
sums of every array in the step's meta item (for a step whose file list was never written), the non-finite
check, the shape check before a restore, and the newest complete step of a folder."""

from __future__ import annotations

import concurrent.futures
import json
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mixlm import storage
from mixlm.errors import (
    CheckpointError,
)

FILE_LIST = "mixlm_files.json"
# zlib.crc32 of each file: benchmarks/checkpoint_io.py times it against adler32, md5, sha256 and blake2b on a
# step's files ("Which checksum"); it catches torn and overwritten bytes, it is no defence against tampering.
CHECKSUM = "crc32"
_OCDBT_PREFIX = "ocdbt.process_"


def _step_files(step_dir) -> dict[str, storage.FileInfo]:
    """{path relative to step_dir: FileInfo} of every file below it but the file list and its per-process parts
    (storage.list_files: a walk on a local disk, one listing with the store's checksums on an object store)."""
    return {name: info for name, info in storage.list_files(step_dir).items()
            if not name.rsplit("/", 1)[-1].startswith(FILE_LIST)}


def file_crc32(path) -> str:
    """zlib.crc32 of a file's bytes, as 8 hex digits (read in 4 MiB chunks)."""
    crc = 0
    with storage.location(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_owner(name: str, process_count: int) -> int:
    """The process that checksums a file of a step (at save and at restore): files under process k's OCDBT
    folder (`state/ocdbt.process_k/`) are process k's (k mod the current count), the rest process 0's."""
    for part in name.split("/"):
        if part.startswith(_OCDBT_PREFIX) and part[len(_OCDBT_PREFIX):].isdigit():
            return int(part[len(_OCDBT_PREFIX):]) % process_count
    return 0


def _checksums(step_dir, names, process_index: int = 0, process_count: int = 1) -> dict[str, str]:
    """{name: crc32} of the files among `names` this process owns (checksum_owner), read back; a few threads,
    as zlib releases the GIL and a remote file system rewards overlapping reads."""
    mine = sorted(n for n in names if checksum_owner(n, process_count) == process_index)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(mine, pool.map(lambda n: file_crc32(step_dir / n), mine)))


def _part_path(step_dir: epath.Path, process_index: int) -> epath.Path:
    return step_dir / f"{FILE_LIST}.process_{process_index}"


def write_checksum_part(step_dir: epath.Path, process_index: int, process_count: int) -> None:
    """Multi-process, processes > 0, on a local (or shared) disk: the checksums of this process's files, for
    process 0 to merge into the file list (write_file_list) so that no process reads the whole checkpoint back.
    Nothing on an object store, whose own checksums process 0 lists."""
    if storage.scheme(step_dir) in storage.STORE_CHECKSUM:
        return
    sums = _checksums(step_dir, _step_files(step_dir), process_index, process_count)
    storage.write_atomic(_part_path(step_dir, process_index), json.dumps(sums, sort_keys=True))


def write_file_list(step_dir: epath.Path, *, checksums: bool = True, process_count: int = 1) -> None:
    """Records every file's size and, with `checksums`, a checksum of each in `<step>/mixlm_files.json` (call on
    process 0 once the step has committed). On a local disk: crc32 of the bytes (this process's files, plus the
    parts other processes wrote). On an object store: the checksum the store keeps for each object (gs: crc32c,
    s3: ETag), from the same one listing as the sizes, so no byte is read back: an object whose bytes change
    gets a new one, as a file's crc32 changes."""
    files = _step_files(step_dir)
    listing: dict = {"files": {name: info.size for name, info in files.items()}}
    store_kind = storage.STORE_CHECKSUM.get(storage.scheme(step_dir))
    if checksums and store_kind:
        listing[store_kind] = {n: files[n].checksum for n in sorted(files) if files[n].checksum_kind == store_kind}
    elif checksums:
        sums = _checksums(step_dir, files, 0, process_count)
        for i in range(1, process_count):
            part = _part_path(step_dir, i)
            if part.exists():  # else those files keep their size check only
                sums.update(json.loads(part.read_text()))
        listing[CHECKSUM] = {name: sums[name] for name in sorted(sums) if name in files}
    storage.write_atomic(step_dir / FILE_LIST, json.dumps(listing, sort_keys=True))
    for i in range(1, process_count):
        storage.remove(_part_path(step_dir, i))


def file_problem(step_dir: epath.Path, *, verify: bool = True, process_index: int = 0,
                 process_count: int = 1) -> str:
    """'' when every file in `mixlm_files.json` is present at its recorded size and, with `verify`, has its
    recorded checksum, else what is wrong. crc32 (a local list) is read back by the files' owners
    (checksum_owner); a store's crc32c / ETag is compared from one listing (where the folder now lives on a
    store that does not report that kind, e.g. a gs:// step copied to a local disk, only sizes are checked).
    Lists written without checksums are checked by size only. A step with no list at all (a run killed right
    after the commit) gives '' here: it is unverified (is_listed), and its callers check what it restores
    (unlisted_problem)."""
    listing = step_dir / FILE_LIST
    if not listing.exists():
        return ""
    try:
        recorded = json.loads(listing.read_text())
        expected = recorded["files"]
        kinds = [k for k in (CHECKSUM, *storage.STORE_CHECKSUM.values()) if k in recorded] if verify else []
        sums = {k: dict(recorded[k]) for k in kinds}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its file list {FILE_LIST} is unreadable"
    actual = _step_files(step_dir)
    for name, size in sorted(expected.items()):
        if name not in actual:
            return f"{name} is missing"
        if actual[name].size != size:
            return f"{name} is {actual[name].size} bytes, expected {size}"
    for kind in kinds:
        if kind == CHECKSUM:
            try:
                found = _checksums(step_dir, [n for n in sums[kind] if n in actual], process_index, process_count)
            except OSError as e:
                return f"a file does not read back ({e})"
        else:
            found = {n: actual[n].checksum for n in sums[kind] if n in actual and actual[n].checksum_kind == kind}
        for name, value in sorted(found.items()):
            if value != sums[kind][name]:
                return f"{name} has {kind} {value}, expected {sums[kind][name]} (same size: its bytes changed)"
    return ""


def is_listed(step_dir: epath.Path) -> bool:
    """Whether the step has its file list (else nothing records what its files should hold: it is unverified)."""
    return (epath.Path(step_dir) / FILE_LIST).exists()


_JITTED: dict = {}  # (fn, output sharding) -> its jit: one trace and compile per state shape, not per save


def _replicated_jit(fn: Callable, arrays: list):
    """fn(arrays) jitted with every output replicated on the arrays' mesh (so each process reads them whole).
    `fn` must be a module-level function: its jit is kept, so the next save of the same state compiles nothing."""
    meshes = [a.sharding.mesh for a in arrays if isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding)]
    out = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec()) if meshes else None
    key = (fn, out)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn, out_shardings=out)
    return _JITTED[key](arrays)


def _non_finite_counts(xs: list) -> list:
    return [jax.numpy.sum(~jax.numpy.isfinite(x)) for x in xs]


def non_finite_values(tree) -> dict[str, int]:
    """{leaf path: count of NaN/inf elements} of the floating-point leaves of `tree` (jax or numpy arrays) that
    have any; {} when every value is finite. One jitted reduction per call; the counts are global (every
    process gets the same answer)."""
    named = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
             if np.issubdtype(x.dtype, np.inexact)]
    if not named:
        return {}
    counts = _replicated_jit(_non_finite_counts, [x for _, x in named])
    return {name: int(c) for (name, _), c in zip(named, counts) if int(c)}


# ---- value sums: what a step's arrays held when it was saved, in its own meta item ---------------------
# Per leaf, two wrapping uint32 sums of the values' bit patterns: plain, and weighted by an odd number made
# from each element's coordinates. Integer sums are exact in any order, so they match across meshes, process
# counts and host or device arithmetic; any one changed element changes the first, a moved one the second.
# They verify a step whose file list is missing (a run killed right after the commit): Orbax commits the meta
# item together with the arrays.

VALUE_SUMS = "value_sums"
_COORD_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C)
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def leaf_names(tree) -> list[str]:
    """'params/layers/0/mlp/down_proj/kernel'-style names of `tree`'s leaves, in jax.tree order."""
    def part(key) -> str:
        return str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))))

    return ["/".join(part(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _summable(x) -> bool:
    return np.dtype(x.dtype).itemsize in _UINT_OF_SIZE and np.dtype(x.dtype) != np.bool_


def _device_sums(x):
    uint = _UINT_OF_SIZE[np.dtype(x.dtype).itemsize]
    bits = jax.lax.bitcast_convert_type(x, uint).astype(np.uint32)
    weight = jax.numpy.ones(x.shape, np.uint32)
    for axis in range(x.ndim):
        coord = jax.lax.broadcasted_iota(np.uint32, x.shape, axis)
        weight = weight + 2 * coord * np.uint32(_COORD_MULTIPLIERS[axis % len(_COORD_MULTIPLIERS)])
    return jax.numpy.sum(bits, dtype=np.uint32), jax.numpy.sum(bits * weight, dtype=np.uint32)


def _all_device_sums(xs: list) -> list:
    return [_device_sums(x) for x in xs]


def host_value_sum(a: np.ndarray, rows_per_chunk: int = 1 << 16) -> str:
    """The value sum (see VALUE_SUMS) of a host array, as 16 hex digits; computed in chunks of rows so a large
    embedding needs no full-size temporaries."""
    a = np.ascontiguousarray(a)
    bits = a.view(_UINT_OF_SIZE[a.dtype.itemsize]).reshape(a.shape)
    if a.ndim == 0:
        bits = bits.reshape(1)
    plain = weighted = 0
    for start in range(0, bits.shape[0], rows_per_chunk):
        chunk = bits[start:start + rows_per_chunk].astype(np.uint32)
        weight = np.ones(chunk.shape, np.uint32)
        for axis in range(a.ndim):
            shape = [1] * chunk.ndim
            shape[axis] = chunk.shape[axis]
            coord = np.arange(chunk.shape[axis], dtype=np.uint32) + np.uint32(start if axis == 0 else 0)
            weight += np.uint32(2) * coord.reshape(shape) * np.uint32(_COORD_MULTIPLIERS[axis % len(_COORD_MULTIPLIERS)])
        plain = (plain + int(chunk.sum(dtype=np.uint32))) & 0xFFFFFFFF
        weighted = (weighted + int((chunk * weight).sum(dtype=np.uint32))) & 0xFFFFFFFF
    return f"{plain:08x}{weighted:08x}"


def value_sums(tree) -> dict[str, str]:
    """{leaf name: value sum} of a pytree of jax arrays (one jitted reduction; every process gets all of
    them); equals host_value_sum of each leaf's values."""
    named = [(n, x) for n, x in zip(leaf_names(tree), jax.tree.leaves(tree)) if _summable(x)]
    if not named:
        return {}
    sums = _replicated_jit(_all_device_sums, [x for _, x in named])
    return {n: f"{int(p):08x}{int(w):08x}" for (n, _), (p, w) in zip(named, sums)}


def unlisted_problem(state, meta: dict, exact: bool) -> str:
    """What is wrong with a step that has no file list, from what it restored ('' when nothing): `state`'s
    values against the value sums of the step's `meta` item (saved with the arrays), else (an older
    checkpoint, other leaves, or `exact` False: vocabulary padding changed on restore) whether they are all
    finite."""
    unlisted = f"it has no file list {FILE_LIST} (the run stopped right after saving it)"
    saved, now = meta.get(VALUE_SUMS) or {}, value_sums(state)
    if exact and now and set(now) <= set(saved):
        changed = [n for n, v in now.items() if saved[n] != v]
        if changed:
            return (f"{unlisted} and the values it restores differ from those saved (value sums of "
                    f"{len(changed)} arrays, e.g. {', '.join(changed[:3])})")
        return ""
    non_finite = non_finite_values(state)
    return f"{unlisted} and {_non_finite_text(non_finite)}" if non_finite else ""


def _non_finite_text(bad: dict[str, int]) -> str:
    total = sum(bad.values())
    first = ", ".join(f"{name} ({n:,})" for name, n in list(bad.items())[:3])
    return f"{total:,} restored values are NaN or infinite (in {first}{', ...' if len(bad) > 3 else ''})"


def restore_args_for(saved_tree, target, vocab_size: int):
    """Checks a checkpoint's array shapes against the restore target. Returns True (strict restore) when
    all match, False when some differ only in vocabulary padding (a dimension padded to a multiple of the
    device count: both sizes ≥ vocab_size); raises CheckpointError for any other difference."""
    saved = ocp.tree.to_flat_dict(saved_tree, sep=".")
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(target, keep_empty_nodes=True), sep=".")
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint's state has a different structure: missing {missing[:5]}, unexpected "
            f"{extra[:5]} (was it written with another model or optimizer?)"
        )
    strict = True
    for key, want in wanted.items():
        have = tuple(getattr(saved[key], "shape", ()) or ())
        if have == tuple(want.shape):
            continue
        differ = [i for i, (a, b) in enumerate(zip(have, want.shape)) if a != b]
        padding_only = len(differ) == 1 and min(have[differ[0]], want.shape[differ[0]]) >= vocab_size
        if len(have) == len(want.shape) and padding_only:
            strict = False  # only the padding rows beyond vocab_size change
            continue
        raise CheckpointError(
            f"the checkpoint's {key} has shape {have}, this run needs {tuple(want.shape)}; the model config "
            "differs from the one that wrote the checkpoint"
        )
    return strict


def newest_complete_step(steps: dict, on_skip: Callable[[int, Any, str], None]) -> int | None:
    """The newest of `steps` ({step: step folder}) whose files are complete (file_problem); each newer one
    that is not is reported to `on_skip(step, folder, problem)`. None when no step is complete."""
    for step in sorted(steps, reverse=True):
        problem = file_problem(epath.Path(steps[step]))
        if not problem:
            return step
        on_skip(step, steps[step], problem)
    return None
