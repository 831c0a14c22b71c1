"""On-disk cache for derived artefacts (text embeddings, LLM judgements, ...).

Entries are addressed by a content key: a hash of everything that determines the value, so a
change of any input (texts, template, model, pooling) gives a new entry and an unchanged input
reuses the old one across runs and models. Files are written to a temporary name and renamed, so
a crash never leaves a half-written entry. Long computations save finished chunks as they go and
resume from them. An unreadable entry is reported with its path, moved aside and recomputed.
"""
import hashlib
import json
import os
import re
import tempfile
from logging import getLogger
from pathlib import Path

import torch
from tqdm import tqdm

from recbole_llm import distributed


def model_home():
    """Folder for model files the plugin makes itself (dequantised GGUF copies, tiny test models):
    ``$RECBOLE_LLM_HOME``, default ``~/.cache/recbole_llm``."""
    return Path(os.environ.get("RECBOLE_LLM_HOME", Path.home() / ".cache" / "recbole_llm"))


def content_key(*parts):
    """Stable hex digest of JSON-serialisable parts (lists of texts included)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def atomic_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_entry(path):
    """The cached object at ``path``, or None if absent or unreadable (then moved aside, logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        getLogger().warning(
            f"Cache entry {path} is unreadable ({type(error).__name__}: {error}); moved to "
            f"{corrupt.name} and recomputing."
        )
        return None


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")[:80] or "x"


class Cache:
    """A folder of cache entries: ``<root>/<namespace>/<name>-<key16>.pt``."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, namespace, name, key):
        return self.root / slug(namespace) / f"{slug(name)}-{key[:16]}.pt"

    def get(self, path):
        return load_entry(path)

    def put(self, path, obj):
        atomic_save(obj, path)
        return obj

    def chunked(self, path, n_items, chunk_size, compute_chunk, desc="computing", show_progress=True,
                stats=None):
        """Concatenation of ``compute_chunk(start, stop)`` over ``range(0, n_items, chunk_size)``.

        Finished chunks are saved under ``<path>.parts/`` and reused after an interruption; the
        whole result is saved at ``path`` and the parts removed. A ``stats`` dict, if given, gets
        the number of items ``computed`` now by this process and ``reused`` from the cache.

        Inside ``distributed.sharing_work`` of a multi-process run, rank r computes the chunks
        r, r + world, ...; after a barrier every rank reads all of them, and rank 0 saves the whole.
        """
        stats = {} if stats is None else stats
        stats.update(computed=0, reused=0)
        cached = self.get(path)
        if cached is not None:
            stats["reused"] = n_items
            return cached
        group = distributed.work_group()
        rank, world = group or (0, 1)
        parts_dir = Path(f"{path}.parts")
        chunks = [(start, min(start + chunk_size, n_items)) for start in range(0, n_items, chunk_size)]
        part_paths = [parts_dir / f"{start:010d}-{stop:010d}.pt" for start, stop in chunks]
        pieces = {}
        share = sum(chunks[index][1] - chunks[index][0] for index in range(rank, len(chunks), world))
        with tqdm(total=share, desc=desc, disable=not show_progress, unit="item") as bar:
            for index in range(rank, len(chunks), world):  # this rank's share: all of them alone
                start, stop = chunks[index]
                piece = self.get(part_paths[index])
                if piece is None:
                    piece = self.put(part_paths[index], compute_chunk(start, stop))
                    stats["computed"] += stop - start
                else:
                    stats["reused"] += stop - start
                pieces[index] = piece
                bar.update(stop - start)
        if group:
            distributed.barrier()  # every share is on disk
            for index, part in enumerate(part_paths):
                if index not in pieces:
                    pieces[index] = self.get(part)
                    if pieces[index] is None:
                        raise RuntimeError(f"chunk {part} of another rank is missing or unreadable")
            distributed.barrier()  # every rank has read the parts: rank 0 may replace them by the whole
        result = _concat([pieces[index] for index in range(len(chunks))])
        if rank != 0:
            return result
        self.put(path, result)
        for part in parts_dir.glob("*.pt"):
            part.unlink()
        if parts_dir.is_dir():
            try:
                parts_dir.rmdir()
            except OSError:
                pass
        return result


def _concat(pieces):
    if not pieces:
        return torch.empty(0)
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces)
    out = []
    for piece in pieces:
        out.extend(piece)
    return out
