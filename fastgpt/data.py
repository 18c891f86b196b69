"""Data: text -> token shards -> random training windows, and packing of variable-length examples.

Token shards (written by ``fastgpt prepare``) are flat arrays of token ids behind a 32-byte header:

    magic b"FGPTTOK1" | uint32 version | uint32 bytes per token (2 or 4) | uint64 tokens | uint32 vocab | pad

Documents are separated by the tokenizer's <|endoftext|> id. A dataset folder holds
``train_000.bin ...``, ``val_000.bin ...`` and ``meta.json`` (tokenizer, counts, sources).
:class:`TokenLoader` memory-maps the shards and samples random windows (uint16 -> int64 on the fly),
so loading costs microseconds per batch and never limits a GPU.

:func:`pack_rows` packs variable-length examples (SFT conversations, ranked responses, PPO
rollouts) into fixed (rows, row_len) batches with ``cu_seqlens`` boundaries: no padding inside a
row except its unused tail, and no attention across examples.
"""
from __future__ import annotations

from .errors import FastGPTError

import glob
import json
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from .console import Progress
from .files import atomic_write
from .tokenizer import Tokenizer, tokenizer_from_dict

MAGIC = b"FGPTTOK1"
HEADER = struct.Struct("<8sIIQI4x")  # 32 bytes
IGNORE_INDEX = -100


class DataError(FastGPTError, ValueError):
    """Bad or missing data (one-line message naming the file, line or field)."""


# ------------------------------------------------------------------------ reading sources
TEXT_EXTENSIONS = (".txt", ".jsonl")


def input_files(paths: Sequence[str | Path], extensions: Sequence[str] = TEXT_EXTENSIONS) -> list[Path]:
    """The files ``paths`` name: a file as it is (any name), a folder's files below it whose names
    end in one of ``extensions`` (sorted), a glob pattern's files (``**`` for any depth)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(tuple(extensions)))
            if not found:
                raise DataError(f"{p}: directory holds no {', '.join(extensions)} files (choose others with --ext)")
            files += found
        elif p.exists():
            files.append(p)
        elif any(c in str(raw) for c in "*?["):
            found = sorted(Path(m) for m in glob.glob(str(raw), recursive=True) if Path(m).is_file())
            if not found:
                raise DataError(f"{raw}: no files match")
            files += found
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def iter_documents(paths: Sequence[str | Path], text_field: str = "text",
                   extensions: Sequence[str] = TEXT_EXTENSIONS) -> Iterator[tuple[str, str]]:
    """(source, text) for every document of :func:`input_files`: a .jsonl line is one (its
    ``text_field``), any other file is one document of UTF-8 text (bad bytes replaced)."""
    for f in input_files(paths, extensions):
        if f.suffix == ".jsonl":
            yield from read_jsonl_field(f, text_field)
        else:
            yield str(f), f.read_text(encoding="utf-8", errors="replace")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; a malformed line names file:line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def read_jsonl_field(path: str | Path, name: str) -> Iterator[tuple[str, str]]:
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get(name), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string field '{name}'")
        yield f"{path}:{lineno}", obj[name]


# ---------------------------------------------------------------------------- shards
def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    dtype = _dtype_for(vocab_size)
    with atomic_write(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, dtype.itemsize, len(tokens), vocab_size))
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


def open_shard(path: Path) -> tuple[np.memmap, int]:
    """Memory-map a shard; returns (tokens, vocab_size)."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise DataError(f"{path}: truncated token shard (no header)")
    magic, version, width, n, vocab = HEADER.unpack(head)
    if magic != MAGIC or version != 1 or width not in (2, 4):
        raise DataError(f"{path}: not a fastgpt token shard (bad header)")
    expected = HEADER.size + n * width
    if path.stat().st_size != expected:
        raise DataError(f"{path}: truncated token shard ({path.stat().st_size} bytes, expected {expected})")
    dtype = np.uint16 if width == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n,)), vocab


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: Tokenizer,
            val_fraction: float = 0.01, shard_tokens: int = 100_000_000, text_field: str = "text",
            seed: int = 0, progress: bool = True, extensions: Sequence[str] = TEXT_EXTENSIONS) -> dict[str, Any]:
    """Tokenize documents into train/val shards under ``out_dir``; returns the written meta."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # shards are written to a staging folder and moved in only when every input has been read, so a
    # failure (malformed line, missing file) leaves an existing dataset in out_dir untouched
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        rng = random.Random(seed)
        buffers: dict[str, list[int]] = {"train": [], "val": []}
        counts = {"train": 0, "val": 0}
        docs = {"train": 0, "val": 0}
        shards: dict[str, list[str]] = {"train": [], "val": []}

        def flush(split: str, final: bool = False) -> None:
            buf = buffers[split]
            while len(buf) >= shard_tokens or (final and buf):
                chunk, buffers[split] = buf[:shard_tokens], buf[shard_tokens:]
                buf = buffers[split]
                name = f"{split}_{len(shards[split]):03d}.bin"
                write_shard(stage / name, np.array(chunk), tokenizer.vocab_size)
                shards[split].append(name)

        # delay: a quick run (or a quick failure) leaves no bar behind, so an error stays one line
        with Progress(None, "prepare", "document", enabled=progress, every=10_000, delay=1.0) as bar:
            for _, text in iter_documents(inputs, text_field, extensions):
                if not text.strip():
                    continue
                split = "val" if rng.random() < val_fraction else "train"
                ids = [tokenizer.eot_id] + tokenizer.encode(text)
                buffers[split].extend(ids)
                counts[split] += len(ids)
                docs[split] += 1
                flush(split)
                bar.update(1)
        if docs["train"] + docs["val"] == 0:
            raise DataError(f"{', '.join(map(str, inputs))}: no documents with text found")
        if docs["val"] == 0 and docs["train"] > 1 and not shards["train"] and val_fraction > 0:
            # a small corpus drew no validation document: move the last one over
            last = buffers["train"]
            cut = max(i for i, t in enumerate(last) if t == tokenizer.eot_id)
            if cut > 0:
                buffers["val"], buffers["train"] = last[cut:], last[:cut]
                counts["val"], counts["train"] = len(buffers["val"]), counts["train"] - len(buffers["val"])
                docs["val"], docs["train"] = 1, docs["train"] - 1
        elif docs["val"] == 0 and docs["train"] == 1 and not shards["train"] and val_fraction > 0:
            # one document (a single big .txt): hold out its tail, so pre-training has a val split
            last = buffers["train"]
            n_val = int(len(last) * val_fraction)
            if n_val > 0:
                buffers["val"], buffers["train"] = [tokenizer.eot_id] + last[-n_val:], last[:-n_val]
                counts["val"], counts["train"] = n_val + 1, counts["train"] - n_val
                docs["val"] = 1
        flush("train", final=True)
        flush("val", final=True)
        meta = {"format": "fastgpt-tokens-1", "tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size,
                "tokens": counts, "documents": docs, "shards": shards, "sources": [str(p) for p in inputs]}
        for split_names in shards.values():
            for name in split_names:
                (stage / name).replace(out / name)
        (stage / "meta.json").write_text(json.dumps(meta, indent=1))
        (stage / "meta.json").replace(out / "meta.json")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return meta


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{path}: not found (run `fastgpt prepare` to build a dataset folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg})") from None


def dataset_tokenizer(data_dir: str | Path) -> Tokenizer:
    return tokenizer_from_dict(load_meta(data_dir)["tokenizer"])


class TokenLoader:
    """Random (batch, block_size) windows from a split's shards; resumable via state_dict.

    Under data parallelism every process draws the same stream of batches and keeps every
    ``world_size``-th one from its ``rank`` on (the others' windows are drawn, never read): N
    processes train on the batches one process would draw in their place."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, batch_size: int,
                 vocab_size: int, seed: int = 0, rank: int = 0, device: torch.device | str = "cpu",
                 world_size: int = 1) -> None:
        meta = load_meta(data_dir)
        names = meta["shards"].get(split, [])
        if not names:
            raise DataError(f"{data_dir}: no '{split}' shards (run `fastgpt prepare`)")
        self.shards = [open_shard(Path(data_dir) / n) for n in names]
        for (tokens, vocab), name in zip(self.shards, names):
            if vocab > vocab_size:
                raise DataError(f"{Path(data_dir) / name}: tokenized with a vocabulary of {vocab} ids, "
                                f"the model has {vocab_size}")
        self.sizes = np.array([len(t) for t, _ in self.shards])
        usable = self.sizes - block_size - 1
        if (usable < 0).all():
            raise DataError(f"{data_dir}: '{split}' split has {int(self.sizes.max())} tokens per shard at most, "
                            f"fewer than block_size + 1 = {block_size + 1}")
        starts = np.clip(self.sizes - block_size, 0, None)  # valid window starts per shard (usable + 1)
        self.weights = starts / starts.sum()
        self.block_size, self.batch_size, self.vocab_size = block_size, batch_size, vocab_size
        self.device = torch.device(device)
        self.data_dir, self.split = Path(data_dir), split
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng([seed, 0])

    def _windows(self) -> list[tuple[int, int]]:
        """(shard, start) of the next batch's rows in the stream."""
        which = self.rng.choice(len(self.shards), size=self.batch_size, p=self.weights)
        return [(int(s), int(self.rng.integers(0, int(self.sizes[s]) - self.block_size))) for s in which]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        windows = [self._windows() for _ in range(self.world_size)][self.rank]
        rows = np.empty((self.batch_size, T + 1), dtype=np.int64)
        for i, (s, start) in enumerate(windows):
            rows[i] = self.shards[s][0][start:start + T + 1]
        if rows.max() >= self.vocab_size:
            raise DataError(f"{self.data_dir}: token id {int(rows.max())} in '{self.split}' is beyond the "
                            f"model's vocabulary of {self.vocab_size}")
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


# ---------------------------------------------------------------------------- packing
@dataclass
class PackedBatch:
    """Examples packed into (rows, row_len); each row's unused tail is one ignored pad segment.

    ``labels[r, t]`` is the target of ``idx[r, t]`` (IGNORE_INDEX where not trained).
    ``spans[i]`` is the flat [start, end) of example ``i`` in the flattened rows.
    """

    idx: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    spans: list[tuple[int, int]]
    n_real: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        """Fraction of the batch's positions that hold real example tokens."""
        return self.n_real / self.idx.numel()

    def last_positions(self) -> torch.Tensor:
        """Flat index of each example's last token, (n_examples,) int64."""
        return torch.tensor([e - 1 for _, e in self.spans], dtype=torch.long, device=self.idx.device)

    def to(self, device: torch.device | str) -> "PackedBatch":
        nb = device != "cpu" and torch.device(device).type == "cuda"
        return PackedBatch(self.idx.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb),
                           self.cu_seqlens.to(device, non_blocking=nb), self.max_seqlen, self.spans,
                           self.n_real, self.extras)


def first_fit(lengths: Sequence[int], n_rows: int | None, row_len: int,
              fill: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Place items in order, each into the first row with room: (row of each placed item, fill).

    With ``n_rows`` fixed it stops at the first item that fits nowhere; with ``n_rows=None`` it
    opens a new row instead. ``fill`` continues from rows already partly filled.
    """
    fill = list(fill) if fill is not None else [0] * (n_rows or 0)
    placed: list[int] = []
    for n in lengths:
        r = next((r for r, f in enumerate(fill) if f + n <= row_len), None)
        if r is None:
            if n_rows is not None or n > row_len:
                break
            fill.append(0)
            r = len(fill) - 1
        fill[r] += n
        placed.append(r)
    return placed, fill


def pack_rows(examples: Sequence[tuple[Sequence[int], Sequence[int] | None]], n_rows: int, row_len: int,
              pad_id: int) -> tuple[PackedBatch, int]:
    """First-fit pack ``examples`` (input ids, labels or None) in order into ``n_rows`` rows.

    Stops at the first example that fits in no row; returns (batch, examples used). Every
    example must be at most ``row_len`` long (truncate before packing, and count it).
    """
    for i, (ids, _) in enumerate(examples):
        if not ids:
            raise DataError(f"example {i} is empty")
        if len(ids) > row_len:
            raise DataError(f"example {i} has {len(ids)} tokens, longer than the row length {row_len}")
    placed, fill = first_fit([len(ids) for ids, _ in examples], n_rows, row_len)
    used = len(placed)
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for i, r in enumerate(placed):
        rows[r].append(i)
    idx = torch.full((n_rows, row_len), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, row_len), IGNORE_INDEX, dtype=torch.long)
    seg_lengths: list[int] = []
    spans: list[tuple[int, int] | None] = [None] * used
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            ids, lab = examples[i]
            n = len(ids)
            idx[r, pos:pos + n] = torch.as_tensor(ids, dtype=torch.long)
            if lab is not None:
                labels[r, pos:pos + n] = torch.as_tensor(lab, dtype=torch.long)
            spans[i] = (r * row_len + pos, r * row_len + pos + n)
            seg_lengths.append(n)
            pos += n
        if pos < row_len:
            seg_lengths.append(row_len - pos)
    cu = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lengths), 0)
    real = sum(fill)
    return PackedBatch(idx, labels, cu, max(seg_lengths), spans, real), used  # type: ignore[arg-type]


def pack_all(examples: Sequence[tuple[Sequence[int], Sequence[int] | None]], row_len: int,
             pad_id: int) -> PackedBatch:
    """Pack every example, in order, into as few rows of ``row_len`` as first-fit needs."""
    _, fill = first_fit([len(ids) for ids, _ in examples], None, row_len)
    batch, used = pack_rows(examples, len(fill), row_len, pad_id)
    assert used == len(examples)
    return batch
