"""Token shards, the random-window loader and packing of variable-length examples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt.data import (HEADER, IGNORE_INDEX, DataError, TokenLoader, iter_documents, load_meta, open_shard,
                          pack_rows, prepare, write_shard)
from fastgpt.model import GPT, positions_from_cu_seqlens
from fastgpt.tokenizer import ByteTokenizer


class WideTokenizer:
    """A fake tokenizer with more than 65536 ids (so shards need uint32)."""

    kind = "wide"
    vocab_size = 70_000
    eot_id = 69_999

    def encode(self, text: str) -> list[int]:
        return [66_000 + (ord(c) % 1000) for c in text]

    def to_dict(self):
        return {"kind": self.kind}


def read_all(data_dir: Path, split: str) -> np.ndarray:
    meta = load_meta(data_dir)
    return np.concatenate([np.asarray(open_shard(data_dir / n)[0]) for n in meta["shards"][split]])


# ------------------------------------------------------------------------------ prepare
def test_prepare_txt_files(tmp_path, byte_tok):
    a, b, c = (tmp_path / f"{n}.txt" for n in "abc")
    a.write_text("hello world")
    b.write_text("second document")
    c.write_text("héllo ünïcode")
    meta = prepare([a, b, c], tmp_path / "d", byte_tok, val_fraction=0.0, progress=False)
    assert meta["documents"] == {"train": 3, "val": 0}
    tokens = read_all(tmp_path / "d", "train")
    eot = byte_tok.eot_id
    expected = []
    for t in ("hello world", "second document", "héllo ünïcode"):
        expected += [eot] + list(t.encode())
    assert tokens.tolist() == expected
    assert meta["tokens"]["train"] == len(expected) and tokens.dtype == np.uint16


def test_prepare_jsonl_and_directory(tmp_path, byte_tok, corpus_docs):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus_docs[:10]) + "\n\n")
    (src / "sub" / "b.txt").write_text(corpus_docs[10])
    (src / "notes.md").write_text("ignored")
    (src / "blank.txt").write_text("   \n")  # whitespace-only documents are skipped
    meta = prepare([src], tmp_path / "d", byte_tok, val_fraction=0.2, text_field="body", progress=False)
    assert meta["documents"]["train"] + meta["documents"]["val"] == 11
    assert meta["documents"]["val"] >= 1
    total = sum(len(t.encode()) + 1 for t in corpus_docs[:11])
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == total
    assert len(read_all(tmp_path / "d", "train")) + len(read_all(tmp_path / "d", "val")) == total
    assert [s for s, _ in iter_documents([src], "body")][-1].endswith("b.txt")


def test_prepare_deterministic_and_sharded(tmp_path, byte_tok, corpus_jsonl):
    m1 = prepare([corpus_jsonl], tmp_path / "a", byte_tok, shard_tokens=1000, progress=False)
    m2 = prepare([corpus_jsonl], tmp_path / "b", byte_tok, shard_tokens=1000, progress=False)
    assert m1 == {**m2, "sources": m1["sources"]}
    assert len(m1["shards"]["train"]) > 3
    sizes = [len(open_shard(tmp_path / "a" / n)[0]) for n in m1["shards"]["train"]]
    assert all(s == 1000 for s in sizes[:-1]) and sum(sizes) == m1["tokens"]["train"]
    for n in m1["shards"]["train"]:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_prepare_single_document_still_has_validation(tmp_path, byte_tok):
    """One big .txt (tinyshakespeare-style) must still give a val split to pre-train with."""
    src = tmp_path / "input.txt"
    src.write_text("To be or not to be, that is the question. " * 200)
    meta = prepare([src], tmp_path / "d", byte_tok, val_fraction=0.1, progress=False)
    assert meta["shards"]["val"] and meta["tokens"]["val"] > 64
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == len(src.read_bytes()) + 2  # + eot of each split
    TokenLoader(tmp_path / "d", "val", 64, 2, 320)  # usable


@pytest.mark.parametrize("vocab, width, dtype", [(ByteTokenizer(), 2, np.uint16), (WideTokenizer(), 4, np.uint32)])
def test_shard_width(tmp_path, corpus_docs, vocab, width, dtype):
    src = tmp_path / "a.txt"
    src.write_text(corpus_docs[0])
    meta = prepare([src], tmp_path / "d", vocab, val_fraction=0.0, progress=False)
    path = tmp_path / "d" / meta["shards"]["train"][0]
    magic, version, w, n, v = HEADER.unpack(path.read_bytes()[:HEADER.size])
    assert (magic, version, w, v) == (b"FGPTTOK1", 1, width, vocab.vocab_size)
    tokens, vs = open_shard(path)
    assert tokens.dtype == dtype and vs == vocab.vocab_size and n == len(tokens)
    assert int(tokens[0]) == vocab.eot_id and int(tokens.max()) < vocab.vocab_size
    if width == 4:
        assert int(tokens.max()) > 65535
        x, y = TokenLoader(tmp_path / "d", "train", 8, 2, 70_000).next_batch()
        assert x.dtype == torch.int64 and int(x.max()) > 65535


def test_header_checks(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100), 320)
    assert len(open_shard(path)[0]) == 100
    raw = path.read_bytes()
    path.write_bytes(b"NOTMAGIC" + raw[8:])
    with pytest.raises(DataError, match="bad header"):
        open_shard(path)
    path.write_bytes(raw[:-3])
    with pytest.raises(DataError, match=r"s\.bin: truncated"):
        open_shard(path)
    path.write_bytes(raw[:10])
    with pytest.raises(DataError, match=r"s\.bin: truncated"):
        open_shard(path)


# ---------------------------------------------------------------------------- bad inputs
def test_missing_and_empty_inputs(tmp_path, byte_tok):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        prepare([tmp_path / "nope.txt"], tmp_path / "d", byte_tok, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: no documents"):
        prepare([empty], tmp_path / "d", byte_tok, progress=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir: directory holds no"):
        prepare([tmp_path / "emptydir"], tmp_path / "d", byte_tok, progress=False)
    with pytest.raises(DataError, match=r"\*\.csv: no files match"):
        prepare([tmp_path / "*.csv"], tmp_path / "d", byte_tok, progress=False)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_any_text_files_by_name_extension_or_glob(tmp_path, byte_tok):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "a.py").write_text("def f():\n    return 1\n")
    (src / "pkg" / "b.py").write_text("x = 2\n")
    (src / "notes.md").write_text("# notes\n")
    (src / "skip.txt").write_text("not with --ext .py,.md\n")
    (src / "data.csv").write_text("a,b\n")
    assert [Path(s).name for s, _ in iter_documents([src], extensions=(".py", ".md"))] == ["a.py", "notes.md", "b.py"]
    globbed = [Path(s).name for s, _ in iter_documents([str(src / "**" / "*.py")])]
    assert globbed == ["a.py", "b.py"]
    meta = prepare([src / "data.csv"], tmp_path / "d", byte_tok, val_fraction=0.0, progress=False)  # any file by name
    assert meta["documents"]["train"] == 1 and meta["tokens"]["train"] == len("a,b\n") + 1
    with pytest.raises(DataError, match="holds no .rs files .choose others with --ext"):
        prepare([src], tmp_path / "e", byte_tok, progress=False, extensions=(".rs",))


def test_malformed_jsonl_names_file_and_line(tmp_path, byte_tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        prepare([bad], tmp_path / "d", byte_tok, progress=False)
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        prepare([bad], tmp_path / "d", byte_tok, progress=False)


def test_loader_errors(tmp_path, tiny_data):
    with pytest.raises(DataError, match="meta.json: not found"):
        TokenLoader(tmp_path, "train", 8, 2, 320)
    with pytest.raises(DataError, match="beyond|vocabulary"):  # ids beyond the model's vocabulary
        TokenLoader(tiny_data, "train", 8, 2, 200)
    with pytest.raises(DataError, match="fewer than block_size"):
        TokenLoader(tiny_data, "val", 100_000, 2, 320)
    with pytest.raises(DataError, match="no 'test' shards"):
        TokenLoader(tiny_data, "test", 8, 2, 320)


def test_ids_beyond_vocab_in_shard_body(tmp_path):
    """A shard whose header claims a small vocabulary but holds a larger id fails at the batch."""
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "train_000.bin", np.full(50, 300), 256)
    (d / "meta.json").write_text(json.dumps({"shards": {"train": ["train_000.bin"]}, "tokenizer": {"kind": "byte"}}))
    loader = TokenLoader(d, "train", 8, 2, 256)
    with pytest.raises(DataError, match="token id 300.*beyond"):
        loader.next_batch()


def test_truncated_shard_in_dataset(tmp_path, tiny_data):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(tiny_data, d)
    name = load_meta(d)["shards"]["train"][0]
    raw = (d / name).read_bytes()
    (d / name).write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match=f"{name}: truncated"):
        TokenLoader(d, "train", 8, 2, 320)


# ------------------------------------------------------------------------------- loader
def test_loader_windows_are_shifted_slices(tiny_data):
    tokens = read_all(tiny_data, "train")
    x, y = TokenLoader(tiny_data, "train", 16, 4, 320, seed=3).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    hay = tokens.tobytes()
    for row in x:
        assert np.asarray(row.numpy(), dtype=np.uint16).tobytes() in hay


def test_loader_exact_block_size_plus_one(tmp_path):
    """A shard of exactly block_size + 1 tokens has one valid window (no division by zero)."""
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "train_000.bin", np.arange(9), 256)
    (d / "meta.json").write_text(json.dumps({"shards": {"train": ["train_000.bin"]}, "tokenizer": {"kind": "byte"}}))
    x, y = TokenLoader(d, "train", 8, 3, 256).next_batch()
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_loader_determinism_and_resume(tiny_data):
    a = TokenLoader(tiny_data, "train", 16, 4, 320, seed=7)
    b = TokenLoader(tiny_data, "train", 16, 4, 320, seed=7)
    c = TokenLoader(tiny_data, "train", 16, 4, 320, seed=7, rank=1, world_size=2)
    first = [a.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(f, b.next_batch()[0]) for f in first)
    # rank 1 of 2 takes the single-process stream's batches 1, 3, ...
    assert torch.equal(first[1], c.next_batch()[0]) and not torch.equal(first[0], first[1])
    state = json.loads(json.dumps(a.state_dict()))  # plain data, survives serialisation
    after = [a.next_batch()[0] for _ in range(3)]
    d = TokenLoader(tiny_data, "train", 16, 4, 320, seed=99)
    d.load_state_dict(state)
    assert all(torch.equal(t, d.next_batch()[0]) for t in after)


# ------------------------------------------------------------------------------ packing
def test_pack_rows_invariants():
    examples = [([1] * n, [2] * n if i % 2 else None) for i, n in enumerate([5, 3, 8, 2, 6, 4, 7])]
    batch, used = pack_rows(examples, n_rows=3, row_len=10, pad_id=0)
    assert batch.idx.shape == batch.labels.shape == (3, 10)
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == 30
    assert (cu[1:] > cu[:-1]).all()
    row_starts = {0, 10, 20}
    assert row_starts <= set(cu.tolist())  # every row starts a segment
    assert batch.max_seqlen == int((cu[1:] - cu[:-1]).max())
    assert len(batch.spans) == used
    flat_idx, flat_lab = batch.idx.view(-1), batch.labels.view(-1)
    covered = torch.zeros(30, dtype=torch.bool)
    for i, (s, e) in enumerate(batch.spans):
        n = len(examples[i][0])
        assert e - s == n and s in cu.tolist() and e in cu.tolist()
        assert s // 10 == (e - 1) // 10  # never crosses a row
        assert (flat_idx[s:e] == 1).all()
        assert (flat_lab[s:e] == (2 if i % 2 else IGNORE_INDEX)).all()
        covered[s:e] = True
    assert (flat_idx[~covered] == 0).all() and (flat_lab[~covered] == IGNORE_INDEX).all()
    assert batch.n_real == int(covered.sum()) == sum(len(examples[i][0]) for i in range(used))
    assert batch.efficiency == pytest.approx(batch.n_real / 30)
    assert batch.last_positions().tolist() == [e - 1 for _, e in batch.spans]
    # first fit, in order: 5+3+2 | 8 | 6+4 -> 7 fits nowhere and stops the packing
    assert used == 6 and batch.efficiency == pytest.approx(28 / 30)
    assert [s // 10 for s, _ in batch.spans] == [0, 0, 1, 0, 2, 2]
    pos = positions_from_cu_seqlens(cu, 30)
    assert all(int(pos[s]) == 0 for s, _ in batch.spans)


def test_pack_rows_errors_and_partial():
    with pytest.raises(DataError, match="example 1 has 11 tokens"):
        pack_rows([([1], None), ([1] * 11, None)], 2, 10, 0)
    with pytest.raises(DataError, match="example 0 is empty"):
        pack_rows([([], None)], 2, 10, 0)
    batch, used = pack_rows([([1, 2, 3], [4, 5, 6])], 2, 10, 0)
    assert used == 1 and batch.cu_seqlens.tolist() == [0, 3, 10, 20] and batch.efficiency == 0.15
    batch, used = pack_rows([], 1, 4, 0)
    assert used == 0 and batch.cu_seqlens.tolist() == [0, 4]


def test_packed_batch_runs_through_model(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg).eval()
    examples = [(list(range(10, 10 + n)), list(range(11, 11 + n))) for n in (7, 5, 9, 3)]
    batch, used = pack_rows(examples, 2, 16, pad_id=257)
    with torch.no_grad():
        _, loss = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                        reduction="none")
        for i, (s, e) in enumerate(batch.spans):
            ids, lab = examples[i]
            _, ref = model(torch.tensor([ids]), torch.tensor([lab]), reduction="none")
            torch.testing.assert_close(loss.view(-1)[s:e], ref[0], atol=1e-5, rtol=1e-5)
