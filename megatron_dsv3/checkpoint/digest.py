"""Digests of checkpoint files, and a manifest of them for a whole checkpoint folder.

  file_digest(path)          sha256 of the sha256 digests of the file's DIGEST_BLOCK_BYTES
                             blocks: one streaming read, the blocks hashed on several threads
                             (hashlib releases the GIL), so hashing a checkpoint just written
                             costs a fraction of writing it
  file_entry(path)           {"bytes": size, "sha256_of_blocks": digest}: a manifest's entry
  write_folder_manifest(folder)
                             MANIFEST in `folder` listing every file under it (sub-folders
                             too), each rank of the default process group hashing its share
  verify_folder_manifest(folder)
                             what is wrong with the folder against its MANIFEST, the same list
                             on every rank; None when it has no MANIFEST
  all_gather_from_ranks(obj) every rank's obj on every rank (a world of one without
                             torch.distributed)

The training job's own checkpoints (train/checkpoint.py) use the digests and the gather;
Megatron's checkpoint folders (`iter_<N>/` under --save, written by Megatron's loop, which checks
neither sizes nor digests when it loads) the folder manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch.distributed as dist

MANIFEST = "manifest.json"
DIGEST_BLOCK_BYTES = 64 << 20  # blocks hashed in parallel; the digest is sha256 of their sha256s
DIGEST_DESCRIPTION = f"sha256 of the sha256 digests of {DIGEST_BLOCK_BYTES} byte blocks"
_READ_CHUNK_BYTES = 8 << 20
_HASH_THREADS = 8


def file_digest(path: Path) -> str:
    """sha256 of the sha256 digests of the file's DIGEST_BLOCK_BYTES blocks."""
    size = path.stat().st_size
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    threads = min(_HASH_THREADS, cores)
    with open(path, "rb") as f, ThreadPoolExecutor(threads) as pool:
        starts = range(0, max(size, 1), DIGEST_BLOCK_BYTES)
        blocks = pool.map(lambda start: _block_digest(f.fileno(), start,
                                                      min(DIGEST_BLOCK_BYTES, size - start)),
                          starts)
        return hashlib.sha256(b"".join(blocks)).hexdigest()


def _block_digest(fd: int, start: int, length: int) -> bytes:
    digest = hashlib.sha256()
    while length > 0:
        chunk = os.pread(fd, min(_READ_CHUNK_BYTES, length), start)
        if not chunk:
            raise OSError(f"file ended {length} bytes early while being hashed")
        digest.update(chunk)
        start, length = start + len(chunk), length - len(chunk)
    return digest.digest()


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256_of_blocks": file_digest(path)}


# ----------------------------------------------------------------------------------------------
# A folder's manifest, written and checked by all ranks together
# ----------------------------------------------------------------------------------------------
def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_from_ranks(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] without torch.distributed)."""
    rank, world = _rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _folder_files(folder: Path) -> list[str]:
    """Every file under `folder` but the manifest (and its temporary), as sorted relative
    POSIX paths."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path.name not in (MANIFEST, MANIFEST + ".tmp"))


def write_folder_manifest(folder: Path) -> None:
    """MANIFEST in `folder`: every file under it with its size and digest. Called by every rank
    once the folder is complete (the files are split over the ranks: the i-th on rank
    i mod world); rank 0 writes it, through a temporary and a rename, so a crash leaves no
    partial manifest. Returns when the manifest is in place on every rank."""
    folder = Path(folder)
    rank, world = _rank_and_world()
    names = _folder_files(folder) if rank == 0 else None
    if world > 1:
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        names = shared[0]
    mine = {name: file_entry(folder / name) for name in names[rank::world]}
    entries = {}
    for part in all_gather_from_ranks(mine):
        entries.update(part)
    if rank == 0:
        temporary = folder / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps({"digest": DIGEST_DESCRIPTION,
                                         "files": dict(sorted(entries.items()))}, indent=1))
        os.replace(temporary, folder / MANIFEST)
    if world > 1:
        dist.barrier()


def verify_folder_manifest(folder: Path) -> Optional[list[str]]:
    """What is wrong with `folder` against its MANIFEST ([]: intact), the same list on every
    rank; None if it has no MANIFEST (written before manifests were, or by another tool).
    Called by every rank: each reads its share of the files (the i-th on rank i mod world).
    Files not in the manifest are not checked."""
    folder = Path(folder)
    rank, world = _rank_and_world()
    if rank == 0:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = {str(name): (int(entry["bytes"]), str(entry["sha256_of_blocks"]))
                     for name, entry in manifest["files"].items()}
        except FileNotFoundError:
            files = None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            files = f"{MANIFEST} is unreadable ({err})"
    else:
        files = None
    if world > 1:
        shared = [files]
        dist.broadcast_object_list(shared, src=0)
        files = shared[0]
    if files is None:
        return None
    if isinstance(files, str):
        return [files]
    problems = []
    for name in sorted(files)[rank::world]:
        size, digest = files[name]
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} when saved")
        elif file_digest(path) != digest:
            problems.append(f"{name} does not match its digest (its bytes changed since the "
                            "save)")
    return sorted(problem for part in all_gather_from_ranks(problems) for problem in part)
