"""
packmamba's tests (pytest, CPU; the GPU-only ones are skipped without CUDA):

    python -m pytest -q

Sections: pack.py (packing, shards, command line); the causal conv1d and the selective scan
(PyTorch references against autograd and against each document run alone, the Triton kernels
against the references, opcheck); the model (packed equals each document alone); train.py;
bench.py. Without CUDA the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set below before anything imports triton) in fp32, on small shapes.
"""
import argparse
import ast
import contextlib
import functools
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest
import tiktoken
import triton
import triton.language as tl
import triton.testing

import bench
import kernels
import pack
import train
from kernels import causal_conv1d_ref, conv1d_bwd_triton, conv1d_fwd_triton
from model import MambaConfig, MambaLM
from pack import Shard, ShardError
from torch.utils._python_dispatch import TorchDispatchMode

DEV = "cuda" if torch.cuda.is_available() else "cpu"




# =============================================================================
# pack.py

E = 256  # EOT of the byte encoding


def random_docs(rng, n, lo, hi, eot=E):
    """Documents [EOT, t...] with distinct contents, so a lost or duplicated one shows."""
    return [np.concatenate([[eot], rng.integers(0, 256, rng.integers(lo, hi))]).astype(np.int64) for _ in range(n)]


def split_rows(tokens, cu):
    return [tokens[r, a:b] for r, c in enumerate(cu) for a, b in zip(c[:-1], c[1:])]


# -----------------------------------------------------------------------------
# packing

def test_cut_document():
    L = 16
    doc = np.concatenate([[E], np.arange(40)])  # 41 tokens -> 15 + 15 + 10 text tokens
    pieces = pack.cut_document(doc, L)
    assert [len(p) for p in pieces] == [16, 16, 11]
    assert all(p[0] == E for p in pieces)
    assert np.array_equal(np.concatenate([doc[:1]] + [p[1:] for p in pieces]), doc)
    assert len(pack.cut_document(doc[:16], L)) == 1  # exactly L tokens: fits a row
    assert len(pack.cut_document(doc[:17], L)) == 2


def test_best_fit_decreasing():
    rows = pack.best_fit_decreasing([6, 9, 4, 2, 3, 5], 10)
    assert sorted(sorted(r) for r in rows) == [[0, 2], [1], [3, 4, 5]]  # 9, 6+4, 5+3+2 (worst fit needs 4 rows)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 2000)
    rows = pack.best_fit_decreasing(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert max(sum(lengths[i] for i in r) for r in rows) <= 100
    assert len(rows) == -(-lengths.sum() // 100)  # as few rows as the tokens allow


def test_pack_documents_invariants():
    rng = np.random.default_rng(1)
    L = 64
    docs = random_docs(rng, 300, 1, 100) + random_docs(rng, 3, L - 1, L) + random_docs(rng, 3, L, L + 1)  # exact L, L+1
    tokens, cu = pack.pack_documents(docs, L, E, rng=np.random.default_rng(2))
    assert tokens.shape == (len(cu), L + 1)
    for r, c in enumerate(cu):
        assert c[0] == 0 and np.all(np.diff(c) > 0) and c[-1] <= L
        assert np.all(tokens[r, c[-1]:] == E)  # padding, and the last document's final target
    stored = split_rows(tokens, cu)
    assert all(d[0] == E and len(d) <= L for d in stored)
    expected = [p for d in docs for p in pack.cut_document(d, L)]
    assert Counter(map(lambda a: a.tobytes(), stored)) == Counter(map(lambda a: a.tobytes(), expected))
    assert sum(len(d) for d in stored) == sum(c[-1] for c in cu) == sum(len(d) for d in expected)


# -----------------------------------------------------------------------------
# shard format and reader

def hand_shard(tmp_path):
    """L = 10. Row 0: [E,1,2] [E,3,4,5] then padding (used 7). Row 1: one document of exactly L tokens."""
    tokens = np.array([[E, 1, 2, E, 3, 4, 5, E, E, E, E],
                       [E, 1, 2, 3, 4, 5, 6, 7, 8, 9, E]])
    cu = [np.array([0, 3, 7]), np.array([0, 10])]
    path = str(tmp_path / "train_000.bin")
    pack.write_shard(path, tokens, cu, 257, E, "byte")
    return path


def test_rows_hand_made(tmp_path):
    s = Shard(hand_shard(tmp_path))
    assert (s.n_rows, s.n_docs, s.seq_len, s.eot, s.vocab_size, s.encoding) == (2, 3, 10, E, 257, "byte")
    x, y, pos = s.rows([1, 0])
    assert x.dtype == y.dtype == np.int64 and pos.dtype == np.int32
    assert x.tolist() == [[E, 1, 2, 3, 4, 5, 6, 7, 8, 9], [E, 1, 2, E, 3, 4, 5, E, E, E]]
    assert y.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, E], [1, 2, E, 3, 4, 5, E, -1, -1, -1]]
    assert pos.tolist() == [list(range(10)), [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]
    assert s.cu_seqlens(0).tolist() == [0, 3, 7]
    assert [d.tolist() for d in s.documents()] == [[E, 1, 2], [E, 3, 4, 5], [E, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


def test_pad_documents():
    x, y = pack.pad_documents([np.array([E, 1, 2]), np.array([E, 3])], E)
    assert x.tolist() == [[E, 1, 2], [E, 3, E]]
    assert y.tolist() == [[1, 2, E], [3, E, -1]]
    x, y = pack.pad_documents([np.array([E, 3])], E, length=4)
    assert x.tolist() == [[E, 3, E, E]] and y.tolist() == [[3, E, -1, -1]]


@pytest.mark.parametrize("vocab", [257, 70000])  # uint16 and uint32 tokens
def test_shard_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(3)
    docs = [np.concatenate([[vocab - 1], rng.integers(0, vocab - 1, n)]) for n in rng.integers(1, 40, 200)]
    tokens, cu = pack.pack_documents(docs, 32, vocab - 1, rng=rng)
    path = str(tmp_path / "val_000.bin")
    pack.write_shard(path, tokens, cu, vocab, vocab - 1, "test")
    assert os.path.getsize(path) % 2 == 0 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    s = Shard(path)
    assert s.tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert np.array_equal(s.tokens, tokens)
    assert all(np.array_equal(s.cu_seqlens(r), c) for r, c in enumerate(cu))
    assert [d.tolist() for d in s.documents()] == [d.tolist() for d in split_rows(tokens, cu)]
    # rows() against a plain loop over the boundaries
    x, y, pos = s.rows(np.arange(s.n_rows))
    for r, c in enumerate(cu):
        p = np.concatenate([np.arange(b - a) for a, b in zip(c[:-1], c[1:])] + [np.arange(32 - c[-1])])
        assert np.array_equal(pos[r], p)
        assert np.array_equal(y[r], np.where(np.arange(32) < c[-1], tokens[r, 1:], -1))


def test_reader_rejects_bad_files(tmp_path):
    good = open(hand_shard(tmp_path), "rb").read()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOTASHRD" + good[8:])
    with pytest.raises(ShardError, match="not a packmamba shard.*pack.py"):
        Shard(str(bad))
    bad.write_bytes(good[:8] + struct.pack("<i", 2) + good[12:])
    with pytest.raises(ShardError, match="version 2.*reads version 1"):
        Shard(str(bad))
    bad.write_bytes(good[:-5])
    with pytest.raises(ShardError, match=f"truncated: header says {len(good)} bytes, file has {len(good) - 5}"):
        Shard(str(bad))
    bad.write_bytes(good[:100])
    with pytest.raises(ShardError, match="truncated"):
        Shard(str(bad))
    with pytest.raises(ShardError, match="no val shards.*run `python pack.py"):
        pack.open_split(str(tmp_path), "val")


# -----------------------------------------------------------------------------
# the command line

TEXTS = ["hello world", "héllo wörld ✓ " * 3, "x" * 150, "a\nb\n", "<|endoftext|> is just text here"]


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXTS[0])
    (src / "sub" / "b.txt").write_text(TEXTS[1])
    (src / "c.txt").write_text(TEXTS[2])
    (src / "empty.txt").write_text("")
    (src / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (src / "ignored.md").write_text("not read")
    lines = [json.dumps({"text": TEXTS[3]}), "", json.dumps({"text": TEXTS[4]}), '{"no_text": 1}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def run_pack(argv, capsys):
    rc = pack.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end(corpus, capsys):
    out = str(corpus / "data")
    argv = ["--input", str(corpus / "in"), str(corpus / "d.jsonl"), "--out_dir", out, "--encoding", "byte",
            "--seq_len", "64", "--val_fraction", "0.2", "--shard_rows", "2", "--workers", "2"]
    rc, stdout, _ = run_pack(argv, capsys)
    assert rc == 0, stdout
    meta = pack.read_meta(out)
    assert (meta["n_docs"], meta["encoding"], meta["vocab_size"], meta["eot"], meta["seq_len"]) == (5, "byte", 257, E, 64)
    assert (meta["skipped_files"], meta["skipped_lines"], meta["n_cut_docs"]) == (1, 1, 1)
    assert meta["splits"]["val"]["n_docs"] == 1 and meta["splits"]["train"]["n_docs"] == 4
    assert "skipped   1 files" in stdout and "fill" in stdout
    shards = pack.open_split(out, "train") + pack.open_split(out, "val")
    assert sorted(os.listdir(out)) == sorted(["meta.json"] + meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"])
    used = sum(s.cu_seqlens(r)[-1] for s in shards for r in range(s.n_rows))
    assert meta["n_tokens"] == used and meta["fill"] == pytest.approx(used / (meta["n_rows"] * 64))
    enc, _ = pack.load_encoding("byte")
    stored = [d.tolist() for s in shards for d in s.documents()]
    expected = [p.tolist() for t in TEXTS for p in pack.cut_document(np.array([E] + enc.encode_ordinary(t)), 64)]
    assert Counter(map(tuple, stored)) == Counter(map(tuple, expected))
    assert Counter(enc.decode(d[1:]) for d in stored) == Counter(TEXTS[:2] + TEXTS[3:] + ["x" * 63] * 2 + ["x" * 24])
    # a second run into the same folder is refused, then replaces the old run with --overwrite
    rc, _, err = run_pack(argv, capsys)
    assert rc != 0 and "pack.py: error:" in err and "--overwrite" in err
    (corpus / "data" / "train_007.bin").write_bytes(b"old")
    (corpus / "data" / "notes.txt").write_text("mine")
    rc, _, _ = run_pack(argv + ["--overwrite", "--seq_len", "128"], capsys)
    assert rc == 0 and pack.read_meta(out)["seq_len"] == 128
    assert "train_007.bin" not in os.listdir(out) and "notes.txt" in os.listdir(out)


def test_gpt2_fallback(corpus, capsys, monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    enc, name = pack.load_encoding("gpt2")
    assert (name, enc.n_vocab, enc.eot_token) == ("byte", 257, 256)
    assert "falling back to the byte encoding" in capsys.readouterr().err
    out = str(corpus / "data")
    rc, _, err = run_pack(["--input", str(corpus / "in"), "--out_dir", out, "--workers", "1"], capsys)
    assert rc == 0 and "warning" in err and pack.read_meta(out)["encoding"] == "byte"
    assert pack.read_meta(out)["requested_encoding"] == "gpt2"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "no documents"),
    ("seq_len", "too small"),
    ("other_run", "already holds another run"),
    ("unwritable", "cannot write to --out_dir"),
    ("encoding", "unknown encoding"),
])
def test_bad_input(tmp_path, capsys, case, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text")
    out = tmp_path / "data"
    args = {"--input": str(tmp_path / "in"), "--out_dir": str(out), "--encoding": "byte", "--workers": "1"}
    if case == "missing":
        args["--input"] = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "in" / "a.txt").write_text("")
    elif case == "seq_len":
        args["--seq_len"] = "8"
    elif case == "other_run":
        out.mkdir()
        (out / "val_000.bin").write_bytes(b"x")
    elif case == "unwritable":
        args["--out_dir"] = str(tmp_path / "in" / "a.txt" / "data")  # below a file
    elif case == "encoding":
        args["--encoding"] = "gpt7"
    rc, _, err = run_pack([a for kv in args.items() for a in kv], capsys)
    assert rc != 0
    last = err.strip().splitlines()[-1]  # earlier lines: tqdm, when it got that far
    assert last.startswith("pack.py: error:") and message in last
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith((".bin", ".tmp", ".json"))]
    assert leftovers == (["val_000.bin"] if case == "other_run" else [])


# -----------------------------------------------------------------------------
# the default corpus

def test_python_documents():
    src = ("import os\n\n@dec(1)\n@dec2\ndef f(x):\n    def g():\n        pass\n    return x\n\n"
           "x = 1\n\nclass C:\n    def m(self): pass\n\nasync def h(): pass\n")
    assert pack.python_documents(src) == [
        "@dec(1)\n@dec2\ndef f(x):\n    def g():\n        pass\n    return x",
        "class C:\n    def m(self): pass",
        "async def h(): pass",
    ]


def test_stdlib_slice():
    root, files = pack.stdlib_files()
    for a, b in zip(files, files[1:]):  # sorted walk: files of one folder in name order
        assert os.path.dirname(a) != os.path.dirname(b) or a < b
    assert not any("site-packages" in f for f in files)
    names = {os.path.relpath(f, root): f for f in files}
    for rel in ["bisect.py", "textwrap.py", "typing.py"]:  # typing.py has decorated top-level functions
        src = open(names[rel], encoding="utf-8").read()
        docs = pack.python_documents(src)
        tops = [n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert len(docs) == len(tops) > 0
        for doc, node in zip(docs, tops):
            (parsed,) = ast.parse(doc).body  # exactly one top-level def/class, decorators and all
            assert type(parsed) is type(node) and parsed.name == node.name
            assert len(parsed.decorator_list) == len(node.decorator_list)
            assert doc in src


# =============================================================================
# causal conv1d: Triton kernels against the reference

B, L, D = 2, 37, 20  # L not a multiple of BLOCK_L, D not a multiple of BLOCK_D
# Tiny tiles: 2 token blocks per row (edge at 32), segments of 4 tokens, one partial channel
# block (test_tile_configs covers several channel blocks).
TILES = dict(BLOCK_L=32, BLOCK_D=32, ROWS=8, num_warps=1)


def pos_from_lengths(rows, L=L, device=DEV):
    """pos (len(rows), L) int32 from each row's document lengths; what is left is padding,
    which is its own segment (positions 0, 1, ... like a document)."""
    pos = torch.empty(len(rows), L, dtype=torch.int32)
    for b, lengths in enumerate(rows):
        t = 0
        for n in list(lengths) + [L - sum(lengths)]:
            pos[b, t:t + n] = torch.arange(n, dtype=torch.int32)
            t += n
    return pos.to(device)


LAYOUTS = {
    # length-1 documents, and boundaries on and next to the token-tile edge (32) and
    # segment edges (multiples of 4)
    "edges": [[1, 1, 1, 4, 1, 7, 1, 15, 1, 1], [3, 1, 4, 4, 19, 1, 1, 2]],
    # one document filling the row / many short documents with a padding tail
    "one_doc_and_short": [[37], [2, 3, 1, 2, 4, 1, 3, 2, 5, 1]],
    # a document cut by the row end / a long padding tail
    "padding": [[30, 7], [9]],
}


def check(x, weight, bias, pos, activation, dout=None, tiles=TILES, rtol=1e-5, atol=1e-5):
    """Triton forward and backward against the reference under autograd."""
    out = conv1d_fwd_triton(x, weight, bias, pos, activation, **tiles)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ref = causal_conv1d_ref(leaves[0], leaves[1], leaves[2], pos, activation)
    torch.testing.assert_close(out, ref.detach(), rtol=rtol, atol=atol)
    if dout is None:
        dout = torch.randn_like(ref)
    ref.backward(dout)
    dx, dw, db = conv1d_bwd_triton(x, weight, bias, pos, dout, activation, **tiles)
    torch.testing.assert_close(dx, leaves[0].grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(dw, leaves[1].grad, rtol=rtol, atol=atol)
    if bias is None:
        assert db is None
    else:
        torch.testing.assert_close(db, leaves[2].grad, rtol=rtol, atol=atol)


def inputs(W, with_bias, dtype=torch.float32, Bb=B, Ll=L, Dd=D):
    x = torch.randn(Bb, Ll, Dd, device=DEV, dtype=dtype)  # (B, L, D)
    weight = torch.randn(Dd, W, device=DEV, dtype=dtype) * 0.5  # (D, W)
    bias = torch.randn(Dd, device=DEV, dtype=dtype) * 0.5 if with_bias else None  # (D,)
    return x, weight, bias


@pytest.mark.parametrize("W,with_bias,activation", [
    (4, True, True), (4, False, False), (3, True, False), (3, False, True), (2, True, True), (2, False, False)])
def test_matches_ref(W, with_bias, activation):
    x, weight, bias = inputs(W, with_bias)
    check(x, weight, bias, pos_from_lengths(LAYOUTS["edges"]), activation)


@pytest.mark.parametrize("layout", [None, "one_doc_and_short", "padding"])
def test_layouts(layout):
    x, weight, bias = inputs(4, True)
    check(x, weight, bias, None if layout is None else pos_from_lengths(LAYOUTS[layout]), True)


def test_strides():
    """x a slice of a wider in_proj output (xz[..., :D]), dout expanded with stride 0."""
    xz = torch.randn(B, L, 2 * D, device=DEV)  # (B, L, 2D)
    x = xz[..., :D]  # (B, L, D), row stride 2D
    _, weight, bias = inputs(4, True)
    dout = torch.randn(1, 1, D, device=DEV).expand(B, L, D)  # (B, L, D), strides (0, 0, 1)
    check(x, weight, bias, pos_from_lengths(LAYOUTS["edges"]), True, dout=dout)


@pytest.mark.parametrize("tiles", [
    dict(BLOCK_L=16, BLOCK_D=8, ROWS=8, AHEAD=3, num_warps=1),  # segments of 2 < W-1 tokens, 3 channel blocks
    dict(BLOCK_L=16, BLOCK_D=16, ROWS=1, AHEAD=1, num_warps=1),  # one segment per program
])
def test_tile_configs(tiles):
    x, weight, bias = inputs(4, True, Bb=1)
    check(x, weight, bias, pos_from_lengths(LAYOUTS["edges"][:1]), True, tiles=tiles)


def test_token_tile(monkeypatch):
    """The conv's token tile on an H200's 132 SMs at 8 x 2048 tokens: the sweep's default where the grid fills its
    waves (D = 4096), else a capped tile that does (conv_rule_h200.json); any grid gets a multiple of 16 in 32..128."""
    class H200:
        multi_processor_count = 132
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H200())
    cuda = torch.device("cuda")
    picks = {D: [kernels._token_tile(cuda, 8, 2048, D // 512, 4, t) for t in (kernels._FWD_TILE, kernels._BWD_TILE)]
             for D in (1536, 4096, 5120)}
    assert picks == {1536: [(48, 64), (80, 96)], 4096: [(64, 64), (128, None)], 5120: [(80, 64), (128, 96)]}
    for Bb, L, n_dblocks in ((1, 7, 1), (3, 1000, 5), (64, 4096, 16)):
        for tile in (kernels._FWD_TILE, kernels._BWD_TILE):
            block_l, _ = kernels._token_tile(cuda, Bb, L, n_dblocks, 4, tile)
            assert block_l % 16 == 0 and 32 <= block_l <= 128


def test_fp64_inputs():
    """fp64 is computed in fp32 inside the kernels: compare at fp32 tolerance."""
    x, weight, bias = inputs(3, True, dtype=torch.float64)
    check(x, weight, bias, pos_from_lengths(LAYOUTS["padding"]), True)


def test_packed_equals_each_document_alone():
    """The reference on packed rows equals the reference run on every document alone;
    without pos (documents leaking into each other) it does not."""
    lengths = LAYOUTS["edges"]
    pos = pos_from_lengths(lengths)
    x, weight, bias = inputs(4, True, dtype=torch.float64)
    packed = causal_conv1d_ref(x, weight, bias, pos, True)  # (B, L, D)
    for b, row in enumerate(lengths):
        alone, t = [], 0
        for n in list(row) + [L - sum(row)]:
            alone.append(causal_conv1d_ref(x[b:b + 1, t:t + n], weight, bias, None, True)[0])
            t += n
        torch.testing.assert_close(packed[b], torch.cat(alone), rtol=1e-12, atol=1e-12)
        leaky = causal_conv1d_ref(x[b:b + 1], weight, bias, None, True)[0]
        assert not torch.allclose(leaky, torch.cat(alone), rtol=1e-6, atol=1e-6)


def d1_pos(Bb, L):
    """pos (Bb, L) int32 of Bb rows as bench.py's packed mode makes them: DESIGN.md's D1 lengths
    (bench.doc_lengths), packed by pack.pack_documents, rows shuffled."""
    docs = [np.concatenate([[0], np.ones(n - 1, np.int64)]) for n in bench.doc_lengths("d1", 2 * Bb * L)]
    tokens, cu = pack.pack_documents(docs, L, 0, rng=np.random.default_rng(0))
    return torch.from_numpy(pack.batch_rows(tokens[:Bb], cu[:Bb], L)[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Dd", [1536, 4096])
def test_real_size(dtype, Dd):
    """B=8, L=2048, rows packed from D1 lengths as bench.py packs them. Ground truth: the reference in
    fp64. Tolerance: a small multiple of the error of the unpacked reference path itself in this dtype."""
    Bb, Ll, W = 8, 2048, 4
    x, weight, bias = inputs(W, True, dtype=dtype, Bb=Bb, Ll=Ll, Dd=Dd)
    dout = torch.randn(Bb, Ll, Dd, device=DEV, dtype=dtype)
    pos = d1_pos(Bb, Ll).to(DEV)

    def grads(fn, *args):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return [out.detach()] + [a.grad for a in leaves]

    def triton_fn(x, weight, bias, pos):
        out = conv1d_fwd_triton(x, weight, bias, pos, True)
        dx, dw, db = conv1d_bwd_triton(x, weight, bias, pos, dout, True)
        return [out, dx, dw, db]

    names = ["out", "dx", "dweight", "dbias"]
    truth = grads(lambda a, w, c: causal_conv1d_ref(a, w, c, pos, True), x.double(), weight.double(),
                  bias.double())
    got = triton_fn(x, weight, bias, pos)
    # The unpacked path's own error: the reference in `dtype` (fp32 math, rounded to dtype)
    # against fp64, one document per row.
    base_truth = grads(lambda a, w, c: causal_conv1d_ref(a, w, c, None, True), x.double(), weight.double(),
                       bias.double())
    base = grads(lambda a, w, c: causal_conv1d_ref(a, w, c, None, True), x, weight, bias)
    for name, g, t, bg, bt in zip(names, got, truth, base, base_truth):
        base_err = (bg.double() - bt).abs().max().item()
        err = (g.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert err <= 2 * base_err + 1e-6 * scale, f"{name}: err {err:.3g} vs unpacked path's {base_err:.3g}"


# =============================================================================
# selective scan, ops and model

SCAN_GRADS = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]


def scan_inputs(Bb, L, Dm, N, dtype=torch.float32, device="cpu", seed=None):
    """Fresh random scan inputs shaped as the model makes them: u and z are halves of one
    (B, L, 2*Dm) tensor, B and C slices of x_proj's output."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    xz = r(Bb, L, 2 * Dm)
    xbc = r(Bb, L, 3 + 2 * N)
    t = dict(u=xz[..., :Dm], delta=r(Bb, L, Dm) * 0.5 - 1, A=-(torch.rand(Dm, N, generator=g, dtype=torch.float64) * 2 + 0.1),
             B=xbc[..., 3:3 + N], C=xbc[..., 3 + N:], D=r(Dm), z=xz[..., Dm:], delta_bias=r(Dm) * 0.3)
    fp = {"A", "D", "delta_bias"}  # parameters stay fp32 (fp64 in fp64 runs)
    return {k: v.to(device=device, dtype=dtype if k not in fp or dtype == torch.float64 else torch.float32)
            for k, v in t.items()}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# Layouts of the tests: length-1 documents, boundaries on and next to the chunk edges (CHUNK is
# set to 8 below), a row that is one document, many short documents, a padding tail.
L_SMALL = 19
SCAN_LAYOUTS = {
    "mixed": [[1, 7, 1, 8, 2], [19]],
    "short": [[1] * 6 + [2, 3, 1], [8, 8, 3]],
    "padding": [[5, 4], [9, 1, 1]],
}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 8)


@triton.jit
def _softplus_kernel(x_ptr, sp_ptr, sig_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    sp = kernels._softplus(tl.load(x_ptr + i, mask=m, other=0.0))
    sig = kernels._softplus_slope(sp)
    tl.store(sp_ptr + i, sp, mask=m)
    tl.store(sig_ptr + i, sig, mask=m)


def test_scan_softplus():
    """The scan kernels' softplus (log1p by a series) and its derivative (from the softplus, as the backward
    forms it) against torch in fp64: large negative inputs (tiny exp), around 0 (the series' slowest point),
    both sides of the threshold 20, random inputs, and both sides of the derivative's switch from its series
    (softplus 1/2). Tolerance: a few fp32 ulp, plus what exp(-|x|) itself loses on a GPU, where it is exp2 of
    the fp32-rounded -|x| log2(e): up to |x| 2^-24 log2(e) ln(2) ~ 6e-8 |x| relative."""
    x = torch.cat([torch.linspace(-80, 80, 4001), 5 * torch.randn(4000),
                   torch.tensor([0.0, -1e-6, 1e-6, 19.999, 20.0, 20.001, -20.0]),
                   math.log(math.expm1(0.5)) + torch.linspace(-1e-3, 1e-3, 101)]).to(DEV)
    sp, sig = torch.empty_like(x), torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, sp, sig, x.numel(), BLOCK=1024)
    x64 = x.double()
    for got, want in ((sp, F.softplus(x64)), (sig, torch.sigmoid(x64))):
        assert ((got.double() - want).abs() / want <= 1e-6 + 1e-7 * x64.abs()).all()


@triton.jit
def _starts_kernel(pos_ptr, out_ptr, L, CHUNK: tl.constexpr, G: tl.constexpr):
    """out[t] = whether token t of a row starts a document, as the scan's walks find it: each chunk's bits
    (kernels._chunk_starts), each group of G tokens' (_group_starts), each token's (_is_start)."""
    for c in range(0, tl.cdiv(L, CHUNK)):
        starts = kernels._chunk_starts(pos_ptr, c * CHUNK, L, 1, CHUNK, True)
        for k in range(0, CHUNK, G):
            bits = kernels._group_starts(starts, k, True)
            for i in tl.static_range(G):
                t = c * CHUNK + k + i
                tl.store(out_ptr + t, kernels._is_start(bits, i).to(tl.int32), mask=t < L)


@pytest.mark.parametrize("G", [4, 8])
def test_scan_chunk_starts(G):
    """The document-start bits the scan's walks read, at the real CHUNK (128: two 64-bit words, which the
    interpreted tests at CHUNK 8 never reach), against pos == 0: starts at the words' and chunks' edges and
    next to them, a run of length-1 documents across the middle edge, a last chunk the row ends inside."""
    L = 2 * kernels.CHUNK + 45
    lengths = [63, 1, 62, 1, 1, 1, 1, 1, 60, 1, 64, 1, 20, 2]
    pos = pos_from_lengths([lengths], L)[0]
    out = torch.full((L,), -1, dtype=torch.int32, device=DEV)
    _starts_kernel[(1,)](pos, out, L, CHUNK=kernels.CHUNK, G=G)
    assert torch.equal(out, (pos == 0).int())


@pytest.mark.parametrize("which", [["fwd"], ["states"], ["adjoint", "--maxnreg", "168"], ["carry"],
                                   ["carry", "--reverse"]], ids=" ".join)
def test_scan_kernels_compile_for_sm90(which):
    """Each scan kernel compiles for sm_90 (H100, H200) as its launcher calls it (the adjoint pass with the
    register cap _bwd_grid may give it), which the interpreter never does; notes/sass.py's offline compile,
    in a process of its own (the interpreter must be off there), prints its registers and loops. The forward
    and its carry pass keep one channel per lane: their loops hold no shuffle, the carry pass's no barrier
    either (with the launcher's alignment they spread each channel over 4 lanes: notes/perf.md v21)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "notes/sass.py", *which], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REG:" in res.stdout and "loop 0x" in res.stdout, res.stdout
    # one channel's states per thread (kernels._channels): no shuffles, and in the carry pass no barriers
    for op in {"fwd": ["SHFL"], "carry": ["SHFL", "BAR"]}.get(" ".join(which), []):
        assert op not in res.stdout, res.stdout


def test_scan_bwd_ref_matches_autograd():
    x = scan_inputs(2, L_SMALL, 6, 4, torch.float64)
    pos = pos_from_lengths(SCAN_LAYOUTS["mixed"], L_SMALL, "cpu")
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    out = kernels.selective_scan_ref(**leaves, pos=pos)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = kernels.selective_scan_bwd_ref(dout, **x, pos=pos)
    for name, key, g in zip(SCAN_GRADS, x, grads):
        assert rel(g, leaves[key].grad) < 1e-12, name


def test_conv_bwd_ref_matches_autograd():
    x = torch.randn(2, L_SMALL, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    pos = pos_from_lengths(SCAN_LAYOUTS["mixed"], L_SMALL, "cpu")
    out = kernels.causal_conv1d_ref(x, w, b, pos)
    dout = torch.randn_like(out)
    out.backward(dout)
    dx, dw, db = kernels.causal_conv1d_bwd_ref(x.detach(), w.detach(), b.detach(), pos, dout)
    for got, want in ((dx, x.grad), (dw, w.grad), (db, b.grad)):
        assert rel(got, want) < 1e-12


@pytest.mark.parametrize("layout", list(SCAN_LAYOUTS))
def test_scan_ref_packed_equals_each_document_alone(layout):
    """The packed reference scan, outputs and every gradient, equals each document run alone;
    dropping pos must break it (so the test can fail)."""
    x = scan_inputs(2, L_SMALL, 6, 4, torch.float64)
    pos = pos_from_lengths(SCAN_LAYOUTS[layout], L_SMALL, "cpu")
    dout = torch.randn(2, L_SMALL, 6, dtype=torch.float64)
    out = kernels.selective_scan_ref(**x, pos=pos)
    grads = kernels.selective_scan_bwd_ref(dout, **x, pos=pos)
    alone_out = torch.zeros_like(out)
    alone = [torch.zeros_like(g) for g in grads]
    per_token = {"u", "delta", "B", "C", "z"}  # the others are summed over documents
    for b in range(2):
        starts = (pos[b] == 0).nonzero().flatten().tolist() + [L_SMALL]
        for s, e in zip(starts[:-1], starts[1:]):
            piece = {k: (v[b:b + 1, s:e] if k in per_token else v) for k, v in x.items()}
            alone_out[b, s:e] = kernels.selective_scan_ref(**piece)[0]
            for acc, key, g in zip(alone, x, kernels.selective_scan_bwd_ref(dout[b:b + 1, s:e], **piece)):
                if key in per_token:
                    acc[b, s:e] = g[0]
                else:
                    acc += g
    assert rel(out, alone_out) < 1e-12
    for name, g, a in zip(SCAN_GRADS, grads, alone):
        assert rel(g, a) < 1e-12, name
    assert rel(kernels.selective_scan_ref(**x, pos=None), alone_out) > 1e-3


def check_scan_triton(L, lengths, segments, bc_lanes, channels=12):
    """The Triton scan on 2 rows of L tokens packed from lengths (None: pos=None) against the reference:
    output, chunk states and every gradient, fresh random inputs, fp32, channel blocks of 8 (12 channels:
    the second partial)."""
    x = scan_inputs(2, L, channels, 4, torch.float32, DEV)
    pos = None if lengths is None else pos_from_lengths(lengths, L, "cpu").to(DEV)
    want, want_states = kernels.selective_scan_ref(**x, pos=pos, return_states=True)
    kw = dict(delta_softplus=True, BD=8, num_warps=1, bc_lanes=bc_lanes, segments=segments)
    got, states = kernels.scan_fwd_triton(**x, pos=pos, **kw)
    assert rel(got, want) < 1e-5 and rel(states, want_states) < 1e-5
    dout = torch.randn_like(want)
    want_g = kernels.selective_scan_bwd_ref(dout, **x, pos=pos)
    got_g = kernels.scan_bwd_triton(dout, **x, pos=pos, states=states, **kw)
    for name, g, w in zip(SCAN_GRADS, got_g, want_g):
        assert rel(g, w) < 1e-5, name


@pytest.mark.parametrize("bc_lanes", [False, True])
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("layout", list(SCAN_LAYOUTS) + [None])
def test_scan_triton_matches_ref(layout, segments, bc_lanes, small_chunks):
    """The Triton scan (interpreted on CPU) against the reference, rows of 19 tokens (not whole
    chunks): rows whole or split into segments (carries chained across them); B and C loaded by
    every lane or one element per lane."""
    check_scan_triton(L_SMALL, SCAN_LAYOUTS.get(layout), segments, bc_lanes)


@pytest.mark.parametrize("bc_lanes", [False, True])
@pytest.mark.parametrize("segments", [1, 2, 3])
def test_scan_triton_whole_chunks(segments, bc_lanes, small_chunks):
    """Rows of whole chunks (3 x 8 tokens), where the kernels drop the past-the-end masks and the loads
    ahead of the last chunk read the last token; documents starting on chunk edges and just after. Two
    segments are 2 chunks and 1: the last segment is shorter than the others."""
    check_scan_triton(3 * kernels.CHUNK, [[1, 7, 8, 1, 7], [9, 15]], segments, bc_lanes)


@pytest.mark.parametrize("segments, bc_lanes", [(2, False), (3, True)])
def test_scan_triton_whole_channel_blocks(segments, bc_lanes, small_chunks):
    """16 channels in blocks of 8, where the backward's kernels drop the channel masks (EVEN_D), in rows of
    whole chunks with documents on chunk edges."""
    check_scan_triton(3 * kernels.CHUNK, [[1, 7, 8, 1, 7], [9, 15]], segments, bc_lanes, channels=16)


@pytest.mark.parametrize("segments, bc_lanes", [(2, False), (3, True)])
def test_scan_triton_carry_pieces(segments, bc_lanes, small_chunks):
    """Segments of several chunks (6 x 8 tokens in 2 or 3 segments), whose carry passes walk one chunk per
    program: the combine picks the carries at the segments' edges out of the chunks', and a piece walks only
    from its last document start (forward; up to its first, backward), none where another starts between it
    and its segment's end. Documents span chunk and segment edges; three start in the first chunk, the last on
    its last token (7: the forward's piece walks just that one); at 3 segments the middle one's last start is
    a chunk's first token (24: that piece must cut off the first segment's carry); the second row is one
    document. Each B/C mode once (the interpreter is slow)."""
    check_scan_triton(6 * kernels.CHUNK, [[5, 2, 17, 9, 2, 13], [48]], segments, bc_lanes)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside, then the setting as it was."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.fixture
def deterministic():
    """deterministic_algorithms for one test."""
    with deterministic_algorithms():
        yield


def test_scan_triton_deterministic_sums(small_chunks, deterministic):
    """With torch.use_deterministic_algorithms the backward writes each channel block's partial sums of dB, dC, dA,
    dD and d(delta bias) for torch to sum (elsewhere it adds them in place): the same checks as above, on that
    path."""
    check_scan_triton(6 * kernels.CHUNK, [[5, 2, 17, 9, 2, 13], [48]], 3, True)


def test_scan_triton_optional_inputs(small_chunks):
    """No D, no z, no delta bias, no softplus; blocks of 2 channels (fewer than the states: dB and dC
    summed by tl.sum, not the reduce-scatter) and two segments."""
    x = scan_inputs(1, 10, 8, 4, torch.float32, DEV)
    for k in ("D", "z", "delta_bias"):
        x[k] = None
    pos = pos_from_lengths([[3, 4]], 10, "cpu").to(DEV)
    x["delta"] = x["delta"].abs()
    want = kernels.selective_scan_ref(**x, pos=pos, delta_softplus=False)
    kw = dict(delta_softplus=False, BD=2, num_warps=1, segments=2)
    got, states = kernels.scan_fwd_triton(**x, pos=pos, **kw)
    assert rel(got, want) < 1e-5
    dout = torch.randn_like(want)
    want_g = kernels.selective_scan_bwd_ref(dout, **x, pos=pos, delta_softplus=False)
    got_g = kernels.scan_bwd_triton(dout, **x, pos=pos, states=states, **kw)
    for name, g, w in zip(SCAN_GRADS, got_g, want_g):
        assert (g is None) == (w is None), name
        if w is not None:
            assert rel(g, w) < 1e-5, name


def test_scan_segments(small_chunks):
    """How rows are split: segments of whole chunks that cover the row; a full wave of programs
    stays whole, a few programs are split; an explicit count is kept (within the chunk count)."""
    u = torch.zeros(2, L_SMALL, 8)  # 3 chunks of 8 tokens
    for programs in (1, 2, 6, 16, 40):
        seg_len, n_seg = kernels._segments(u, programs, None, per_sm=16)  # CPU: one "multiprocessor"
        assert seg_len % kernels.CHUNK == 0 and (n_seg - 1) * seg_len < L_SMALL <= n_seg * seg_len
    assert kernels._segments(u, 16, None, per_sm=16)[1] == 1
    assert kernels._segments(u, 1, None, per_sm=16)[1] == 3
    assert kernels._segments(u, 1, 2, per_sm=16) == (16, 2) and kernels._segments(u, 1, 9, per_sm=16) == (8, 3)


def test_scan_bwd_grid(small_chunks):
    """The backward's passes. The adjoint pass: uncapped where whole rows fill one wave of
    SCAN_BWD_PROGRAMS_PER_SM at least 40% (one "multiprocessor" on CPU), else capped (SCAN_BWD_CAP) and split
    to fill its programs per SM. The states pass, with no carry pass to pay for: capped, one chunk per
    segment, or the segments asked for."""
    u = torch.zeros(2, L_SMALL, 8)  # 3 chunks of 8 tokens
    full, cap = kernels.SCAN_BWD_PROGRAMS_PER_SM, kernels.SCAN_BWD_CAP
    assert kernels._bwd_grid(u, full, None, True) == (3 * 8, 1, None)
    assert kernels._bwd_grid(u, full // 2, None, True) == (3 * 8, 1, None)
    assert kernels._bwd_grid(u, 1, None, True)[1:] == (3, cap["maxnreg"])
    for programs in (1, full // 2, full):
        assert kernels._bwd_grid(u, programs, None, False) == (8, 3, cap["maxnreg"])
    assert kernels._bwd_grid(u, full, 2, False) == (16, 2, cap["maxnreg"])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck(device):
    """torch.library.opcheck on every op: schema, fake kernels (shapes and strides), autograd."""
    x = scan_inputs(1, 9, 4, 4, torch.float32, device)
    pos = pos_from_lengths([[4, 3]], 9, "cpu").to(device)
    states = kernels.selective_scan_ref(**x, pos=pos, return_states=True)[1].to(device)
    dout = torch.randn(1, 9, 4, device=device)
    scan_args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], pos)
    torch.library.opcheck(kernels._scan_bwd, (dout,) + scan_args + (states, True))  # no double backward
    grad_args = tuple(t.clone().requires_grad_() for t in scan_args[:-1]) + (pos,)
    torch.library.opcheck(kernels._scan_fwd, grad_args + (True,))
    xc, w, bias = (torch.randn(*s, device=device) for s in ((1, 9, 4), (4, 4), (4,)))
    torch.library.opcheck(kernels._conv1d_bwd, (dout, xc, w, bias, pos, True))
    conv_args = tuple(t.clone().requires_grad_() for t in (xc, w, bias))
    torch.library.opcheck(kernels._conv1d_fwd, conv_args + (pos, True))


def tiny_model(dtype, ops="kernels", device="cpu"):
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=61, d_model=32, n_layer=2, d_state=4, ops=ops)
    return MambaLM(cfg).to(device=device, dtype=dtype)


def packed_vs_alone(model, lens, L, device):
    """(max relative error of logits, of loss x tokens, of every parameter gradient) between a packed
    row and each of its documents run alone (losses and gradients summed over the documents)."""
    idx = torch.randint(0, 61, (1, L), device=device)
    targets = torch.randint(0, 61, (1, L), device=device)
    targets[0, sum(lens):] = -1  # the padding tail
    pos = pos_from_lengths([lens], L, "cpu").to(device)
    logits, _ = model(idx, pos=pos)
    _, loss = model(idx, targets, pos)
    (loss * (targets != -1).sum()).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    errs, total = [], 0.0
    for i, n in enumerate(lens):
        s = sum(lens[:i])
        lg, _ = model(idx[:, s:s + n])
        _, ls = model(idx[:, s:s + n], targets[:, s:s + n])
        (ls * n).backward()
        total = total + ls.detach() * n
        errs.append(rel(logits[:, s:s + n], lg))
    grad_err = max(rel(a, p.grad) for a, p in zip(packed_grads, model.parameters()))
    model.zero_grad()
    return max(errs), rel(loss.detach() * (targets != -1).sum(), total), grad_err


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_model_packed_equals_each_document_alone(dtype, tol):
    model = tiny_model(dtype)
    errs = packed_vs_alone(model, [5, 1, 10, 6], 24, "cpu")
    assert max(errs) < tol, errs


def test_model_without_pos_mixes_documents():
    """The same check with pos dropped must fail: the documents leak into each other."""
    model = tiny_model(torch.float64)
    idx = torch.randint(0, 61, (1, 16))
    logits, _ = model(idx)
    alone, _ = model(idx[:, 8:])
    assert rel(logits[:, 8:], alone) > 1e-3


def test_model_ref_ops_match_kernel_ops():
    model_k, model_r = tiny_model(torch.float64), tiny_model(torch.float64, ops="ref")
    idx = torch.randint(0, 61, (2, 12))
    pos = pos_from_lengths([[4, 8], [12]], 12, "cpu")
    _, lk = model_k(idx, idx, pos)
    _, lr = model_r(idx, idx, pos)
    lk.backward()
    lr.backward()
    assert rel(lk, lr) < 1e-12
    assert max(rel(a.grad, b.grad) for a, b in zip(model_k.parameters(), model_r.parameters())) < 1e-12


class OpCount(TorchDispatchMode):
    """Counts the ops that run under it, by name (aten.mm, packmamba.scan_fwd, ...)."""

    def __init__(self):
        super().__init__()
        self.n = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def recompute_case(recompute, compiled=False, autocast=False, device="cpu", n_layer=2):
    """One packed batch of fresh random tokens (a padding tail, ignored targets) through the model with
    config.recompute on or off: (loss, every parameter gradient, bytes autograd saved, ops the backward ran)."""
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=61, d_model=32, n_layer=n_layer, d_state=4, recompute=recompute)
    model = MambaLM(cfg).to(device)
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 61, (2, 24), generator=g), torch.randint(0, 61, (2, 24), generator=g)
    targets[1, 20:] = -1
    pos = pos_from_lengths([[5, 1, 10, 8], [7, 13]], 24, "cpu")
    idx, targets, pos = idx.to(device), targets.to(device), pos.to(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):  # unique storages that are not parameters; the compiled function saves through this too
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    run = torch.compile(model, fullgraph=True) if compiled else model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device, torch.bfloat16, enabled=autocast):
        _, loss = run(idx, targets, pos)
    with OpCount() as ops:
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], sum(saved.values()), ops.n


def assert_same(a, b, exact):
    """Bit for bit, or (where recomputed ops may round differently: CUDA, inductor's fused kernels)
    within fp32 rounding, norm-wise: a wrong recomputed value would be off by O(1)."""
    if exact:
        assert torch.equal(a, b)
    else:
        assert rel(a, b) < 1e-5, f"relative difference {rel(a, b):.1e} in a tensor of shape {tuple(b.shape)}"


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_recompute_is_exact_eager(autocast, device):
    """config.recompute: the same loss and gradients (bit for bit on CPU); the backward re-runs the conv
    (once per layer) and delta's matmul, but not the scan and not the in_proj / x_proj matmuls."""
    loss, grads, _, ops = recompute_case(False, autocast=autocast, device=device)
    loss_r, grads_r, _, ops_r = recompute_case(True, autocast=autocast, device=device)
    assert_same(loss_r, loss, device == "cpu")
    for g, g_r in zip(grads, grads_r):
        assert_same(g_r, g, device == "cpu")
    assert ops["packmamba.conv1d_fwd"] == 0 and ops_r["packmamba.conv1d_fwd"] == 2
    assert ops["packmamba.scan_fwd"] == ops_r["packmamba.scan_fwd"] == 0
    assert ops_r["aten.mm"] == ops["aten.mm"] + 2  # dt_proj, per layer


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_recompute_is_exact_compiled(device):
    """The same under torch.compile(fullgraph=True): the selective checkpoint traces through the custom
    ops, gives the loss and gradients of recompute off, and the compiled function saves less."""
    loss, grads, saved, _ = recompute_case(False, compiled=True, device=device)
    loss_r, grads_r, saved_r, _ = recompute_case(True, compiled=True, device=device)
    assert_same(loss_r, loss, False)  # bitwise on CPU when written (torch 2.13), but inductor may fuse differently
    for g, g_r in zip(grads, grads_r):
        assert_same(g_r, g, False)
    assert saved_r < 0.75 * saved, (saved_r, saved)


# -----------------------------------------------------------------------------
# GPU only: real sizes, bf16 and fp32, against an fp64 reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Dm", [1536, 4096])
def test_scan_real_size(dtype, Dm):
    """Rows of 2048 packed from D1 lengths. Tolerance: 3x the unpacked reference path's own error
    against fp64 at the same input precision (plus fp32 rounding)."""
    Bb, L = 2, 2048
    pos = d1_pos(Bb, L).cuda()
    x = scan_inputs(Bb, L, Dm, 16, dtype, "cuda")
    x64 = {k: v.double() for k, v in x.items()}
    x32 = {k: v.float() for k, v in x.items()}
    want, want_states = kernels.selective_scan_ref(**x64, pos=pos, return_states=True)
    own = kernels.selective_scan_ref(**x32, pos=pos).to(dtype)
    got, states = kernels.scan_fwd_triton(**x, pos=pos, delta_softplus=True)
    assert rel(got, want) <= 3 * rel(own, want) + 1e-6
    assert rel(states, want_states) < 1e-5
    dout = torch.randn(Bb, L, Dm, device="cuda").to(dtype)
    want_g = kernels.selective_scan_bwd_ref(dout.double(), **x64, pos=pos)
    own_g = kernels.selective_scan_bwd_ref(dout.float(), **x32, pos=pos)
    got_g = kernels.scan_bwd_triton(dout, **x, pos=pos, states=states, delta_softplus=True)
    for name, gg, w, o in zip(SCAN_GRADS, got_g, want_g, own_g):
        assert rel(gg, w) <= 3 * rel(o.to(gg.dtype), w) + 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scan_deterministic_cuda():
    """The backward's gradients bit for bit the same in two runs under torch.use_deterministic_algorithms (partial
    sums), and within bf16 rounding of the default's (sums added in place, in the order the programs run)."""
    Bb, L, Dm = 2, 2048, 1536
    x = scan_inputs(Bb, L, Dm, 16, torch.bfloat16, "cuda")
    pos = d1_pos(Bb, L).cuda()
    _, states = kernels.scan_fwd_triton(**x, pos=pos, delta_softplus=True)
    dout = torch.randn(Bb, L, Dm, device="cuda").to(torch.bfloat16)
    run = lambda: kernels.scan_bwd_triton(dout, **x, pos=pos, states=states, delta_softplus=True)
    fast = run()
    with deterministic_algorithms():
        first, second = run(), run()
    for name, f, a, b in zip(SCAN_GRADS, fast, first, second):
        assert torch.equal(a, b), name
        assert rel(f, a) < 1e-2, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_packed_equals_each_document_alone_cuda():
    model = tiny_model(torch.float32, device="cuda")
    errs = packed_vs_alone(model, [37, 1, 100, 64], 256, "cuda")
    assert max(errs) < 1e-5, errs


# =============================================================================
# the LM head's loss: kernels.linear_cross_entropy


def ce_case(T, V, C, dtype, device, ignore=(1, 4)):
    """Random x (T, C), weight (V, C) (leaves) and targets (T,) with some ignored (-1)."""
    x = torch.randn(T, C, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, C, device=device, dtype=dtype) / C ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), device=device)
    targets[[i for i in ignore if i < T]] = -1
    return x, w, targets


def ce_grads(loss_fn, x, w, targets):
    """(loss, dx, dw) of loss_fn(x, w, targets), on fresh copies of the leaves."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(x, w, targets)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def plain_ce(x, w, targets):
    return F.cross_entropy((x @ w.t()).to(torch.promote_types(x.dtype, torch.float32)), targets, ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [61, 2048, 3000])  # under, at and over one block of the kernel (2048)
def test_cross_entropy_rows_triton_matches_ref(dtype, V):
    """The row kernel (interpreted on CPU) against its reference twin: row losses, the gradient it writes
    over the logits, ignored rows, large logits (the online max must not overflow)."""
    logits = (torch.randn(7, V, device=DEV) * 4).to(dtype)
    logits[2, V // 3] = 60.0  # exp would overflow in fp16 and bf16 without the max taken out
    targets = torch.randint(0, V, (7,), device=DEV)
    targets[[0, 5]] = -1
    n = (targets != -1).sum()
    want_logits, got_logits = logits.clone(), logits.clone()
    want = kernels.cross_entropy_rows_ref(want_logits, targets, n, True)
    got = kernels.cross_entropy_rows_triton(got_logits, targets, n, True)
    assert got[[0, 5]].abs().max() == 0 and got_logits[[0, 5]].abs().max() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ulp = torch.finfo(dtype).eps  # the exps differ by the rounding of lse (two ways of summing) times |x - lse|
    want_g = want_logits.float()
    torch.testing.assert_close(got_logits.float(), want_g, rtol=max(2 * ulp, 1e-5), atol=2 * ulp * want_g.abs().max())
    untouched = logits.clone()
    assert torch.equal(kernels.cross_entropy_rows_triton(untouched, targets, n, False), got)
    assert torch.equal(untouched, logits)  # need_grad False leaves the logits alone


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_linear_cross_entropy_matches_autograd(dtype, tol, monkeypatch):
    """Loss and both gradients against lm_head + F.cross_entropy through autograd, over several chunks
    with a short last one, and the same loss without grad (no gradients formed)."""
    monkeypatch.setattr(kernels, "CE_CHUNK_ELEMS", 61 * 8)  # chunks of 8 rows: 37 = 4 x 8 + 5
    x, w, targets = ce_case(37, 61, 16, dtype, "cpu")
    want = ce_grads(plain_ce, x, w, targets)
    got = ce_grads(kernels.linear_cross_entropy, x, w, targets)
    for g, r in zip(got, want):
        assert rel(g, r) < tol
    with torch.no_grad():
        loss, dx, dw = kernels._linear_ce(x, w, targets, dtype, False)
    assert rel(loss, want[0]) < tol and dx.numel() == dw.numel() == 0


def test_linear_cross_entropy_all_ignored():
    """No target at all: loss 0 and zero gradients (F.cross_entropy would give nan)."""
    x, w, targets = ce_case(5, 61, 16, torch.float32, "cpu")
    loss, dx, dw = ce_grads(kernels.linear_cross_entropy, x, w, torch.full_like(targets, -1))
    assert loss == 0 and dx.abs().max() == 0 and dw.abs().max() == 0


def test_linear_cross_entropy_opcheck():
    x, w, targets = ce_case(9, 61, 16, torch.float32, DEV)
    torch.library.opcheck(kernels._linear_ce, (x, w, targets, torch.float32, True))
    torch.library.opcheck(kernels._linear_ce, (x.detach(), w.detach(), targets, torch.float32, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_cross_entropy_real_size_cuda():
    """bf16 matmuls at the vocabulary of gpt2 over several chunks: loss and gradients against fp64, no
    further off than lm_head + F.cross_entropy under the same bf16 autocast."""
    x, w, targets = ce_case(4096, 50264, 256, torch.float32, "cuda", ignore=range(0, 4096, 7))
    truth = ce_grads(plain_ce, x.double(), w.double(), targets)
    with torch.autocast("cuda", torch.bfloat16):
        own = ce_grads(plain_ce, x, w, targets)
        got = ce_grads(lambda *a: kernels.linear_cross_entropy(*a, torch.bfloat16), x, w, targets)
    for name, g, o, t in zip(("loss", "dx", "dw"), got, own, truth):
        assert rel(g, t) <= 2 * rel(o, t) + 1e-6, name


# =============================================================================
# train.py

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny byte-level dataset: 120 short texts over a 17-word vocabulary, rows of 64 tokens."""
    root = tmp_path_factory.mktemp("train_data")
    rnd = random.Random(0)
    words = "the cat sat on a mat while dogs ran in parks and birds sang songs of spring".split()
    os.makedirs(root / "txt")
    for i in range(120):
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 40))) + "."
        (root / "txt" / f"{i:03d}.txt").write_text(text)
    assert pack.main(["--input", str(root / "txt"), "--out_dir", str(root / "data"), "--seq_len", "64",
                      "--encoding", "byte", "--workers", "1", "--val_fraction", "0.1"]) == 0
    return str(root / "data")


def run_train(data_dir, out_dir, *extra):
    argv = ["--data_dir", data_dir, "--out_dir", str(out_dir), "--device", "cpu", "--no-compile",
            "--batch_size", "4", "--eval_iters", "2", *extra]
    return train.main(argv)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_loss_falls(data_dir, tmp_path, packed, capsys):
    assert run_train(data_dir, tmp_path, "--max_iters", "12", "--eval_interval", "12", *(["--packed"] if packed else [])) == 0
    steps, evals = read_log(tmp_path)
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert np.mean([r["loss"] for r in steps[-3:]]) < np.mean([r["loss"] for r in steps[:3]]) - 0.5
    assert [e["step"] for e in evals] == [0, 12] and evals[1]["val_loss"] < evals[0]["val_loss"] - 0.5
    out = capsys.readouterr().out
    assert "step 12/12 | loss " in out and " tok/s" in out and "eval step 12 | val loss " in out
    # the tokens counted are the real targets: a packed row holds several documents, a padded row one
    tokens = [r["tokens"] for r in steps]
    assert all(t <= 4 * 64 for t in tokens)
    assert (np.mean(tokens) > 0.9 * 4 * 64) == packed
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 12 and ckpt["config"]["d_model"] == 128 and ckpt["args"]["packed"] == packed


def test_resume_continues_the_run(data_dir, tmp_path, capsys):
    """3 steps + --resume for 3 more = 6 steps straight: same losses, same data position. The resumed
    part runs with --recompute, which changes no math (and does not keep the checkpoint from loading)."""
    common = ["--packed", "--eval_interval", "3", "--warmup_iters", "1", "--lr_decay_iters", "6"]
    assert run_train(data_dir, tmp_path / "straight", *common, "--max_iters", "6") == 0
    assert run_train(data_dir, tmp_path / "split", *common, "--max_iters", "3") == 0
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["data"] == {"epoch": 0, "index": 12}
    capsys.readouterr()
    assert run_train(data_dir, tmp_path / "split", *common, "--max_iters", "6", "--resume", "--recompute") == 0
    assert "recompute on" in capsys.readouterr().out
    straight, _ = read_log(tmp_path / "straight")
    split, _ = read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, split):
        assert a["lr"] == pytest.approx(b["lr"]) and a["index"] == b["index"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_resume_wraps_epochs(data_dir, tmp_path):
    """The train split has 174 rows: batch 64 x 3 steps crosses into epoch 1 and the position says so."""
    assert run_train(data_dir, tmp_path, "--packed", "--max_iters", "3", "--eval_interval", "3",
               "--batch_size", "64") == 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["data"] == {"epoch": 1, "index": 3 * 64 - 174}


def test_resume_errors(data_dir, tmp_path, capsys):
    assert run_train(data_dir, tmp_path, "--packed", "--max_iters", "1", "--preset", "tiny") == 0
    capsys.readouterr()
    assert run_train(data_dir, tmp_path, "--packed", "--max_iters", "2", "--preset", "small", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --resume") and "preset tiny" in err and "d_model 128 -> 384" in err
    assert "--preset tiny" in err and "Traceback" not in err
    assert run_train(data_dir, tmp_path, "--max_iters", "2", "--resume") == 2  # trained packed, resumed padded
    assert "--packed" in capsys.readouterr().err
    assert run_train(data_dir, tmp_path, "--packed", "--max_iters", "1", "--resume") == 2
    assert "--max_iters" in capsys.readouterr().err
    assert run_train(data_dir, tmp_path / "nothing", "--packed", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    assert run_train(data_dir, tmp_path, "--packed", "--max_iters", "2", "--resume") == 2
    assert "cannot read" in capsys.readouterr().err


def test_data_errors(data_dir, tmp_path, capsys):
    assert run_train(str(tmp_path / "missing"), tmp_path / "out", "--packed") == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and "python pack.py" in err and "Traceback" not in err
    # a truncated shard
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    path = bad / "train_000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    assert run_train(str(bad), tmp_path / "out", "--packed") == 2
    assert "truncated" in capsys.readouterr().err
    # val shards of another tokenizer/vocabulary than the train shards
    mixed = tmp_path / "mixed"
    shutil.copytree(data_dir, mixed)
    tokens, cu = pack.pack_documents([np.array([300, 5, 6, 7])], 64, 300)
    pack.write_shard(str(mixed / "val_000.bin"), tokens, cu, 301, 300, "other")
    assert run_train(str(mixed), tmp_path / "out", "--packed") == 2
    err = capsys.readouterr().err
    assert "vocab 257" in err and "vocab 301" in err


def test_bad_options(data_dir, tmp_path, capsys):
    for argv in (["--batch_size", "0"], ["--max_iters", "-1"], ["--grad_accum", "x"], ["--preset", "huge"]):
        with pytest.raises(SystemExit) as e:
            run_train(data_dir, tmp_path, *argv)
        assert e.value.code == 2
        assert "train.py: error: argument" in capsys.readouterr().err
    assert run_train(data_dir, tmp_path, "--lr", "1e-4", "--min_lr", "1e-3") == 2
    assert "--min_lr" in capsys.readouterr().err


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for opt in ("--data_dir", "--out_dir", "--preset", "--batch_size", "--max_iters", "--eval_interval",
                "--compile", "--resume", "--device", "--seed", "--packed", "--grad_accum", "--grad_clip", "--recompute"):
        assert opt in out
    assert "(default: data)" in out and "(default: auto)" in out


def test_grad_accum_matches_one_big_batch(data_dir, tmp_path):
    """grad_accum 2 x batch 2 takes the same step as batch 4: every real target token weighs the same."""
    assert run_train(data_dir, tmp_path / "a", "--packed", "--max_iters", "2", "--eval_interval", "2") == 0
    assert run_train(data_dir, tmp_path / "b", "--packed", "--max_iters", "2", "--eval_interval", "2",
               "--batch_size", "2", "--grad_accum", "2") == 0
    a, _ = read_log(tmp_path / "a")
    b, _ = read_log(tmp_path / "b")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-4)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compile_fullgraph_packed(data_dir, device):
    """torch.compile(fullgraph=True) traces the whole model with packed pos (on CUDA through the Triton
    kernels); same loss and grads as eager."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=257, d_model=32, n_layer=2)).to(device)
    shard = pack.open_split(data_dir, "train")[0]
    x, y, pos = (torch.from_numpy(a).to(device) for a in shard.rows([0, 1]))
    assert (pos == 0).sum() > 2  # several documents in these rows
    _, loss = model(x, y, pos)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    _, loss_c = compiled(x, y, pos)
    loss_c.backward()
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_no_val_shards(data_dir, tmp_path, capsys):
    """Data without val shards trains without evaluation and says so."""
    only_train = tmp_path / "data"
    shutil.copytree(data_dir, only_train)
    for f in os.listdir(only_train):
        if f.startswith("val_"):
            os.remove(only_train / f)
    assert run_train(str(only_train), tmp_path / "out", "--packed", "--max_iters", "2") == 0
    assert "no val shards" in capsys.readouterr().out
    steps, evals = read_log(tmp_path / "out")
    assert len(steps) == 2 and evals == []


# =============================================================================
# bench.py

TINY = ["--preset", "tiny", "--device", "cpu", "--seq_len", "16", "--batch_size", "2", "--repeats", "1"]


@pytest.fixture
def bench_data(tmp_path):
    """A train shard of 12 short documents of distinct lengths (byte vocabulary), as pack.py writes it."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[256], rng.integers(0, 256, n - 1)]) for n in range(2, 14)]
    tokens, cu = pack.pack_documents(docs, 16, 256)
    pack.write_shard(str(tmp_path / "train_000.bin"), tokens, cu, 257, 256, "byte")
    return str(tmp_path)


def test_length_distributions():
    d1 = bench.doc_lengths("d1", 131072)
    assert len(d1) == 174 and d1.sum() >= 131072 > d1[:-1].sum()
    assert d1.min() >= 16 and d1.max() <= 2048
    d2 = bench.doc_lengths("d2", 131072)
    assert d2.sum() >= 131072 > d2[:-1].sum()
    assert d2.min() >= 64 and d2.max() <= 2048
    assert list(d2[:3]) == list(np.random.default_rng(1).integers(64, 2049, 3))
    args = argparse.Namespace(data_dir="", dist="d1", max_tokens=131072, vocab_size=257)
    docs, vocab_size, eot, source = bench.make_documents(args)
    assert [len(d) for d in docs] == list(d1) and all(d[0] == eot == 256 for d in docs)
    assert max(d[1:].max() for d in docs) < eot and (vocab_size, source) == (257, "d1")


def test_padded_groups():
    # [100] + 50: 2 x 100 <= 800; + 400: 3 x 400 > 800; [400] + 30: 2 x 400 <= 800; + 200: 3 x 400 > 800
    assert bench.padded_groups([100, 50, 400, 30, 200], 800) == [[0, 1], [2, 3], [4]]
    assert bench.padded_groups([800, 1], 800) == [[0], [1]]


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_smoke_all_modes(tmp_path, bench_data, recompute, capsys):
    out = tmp_path / "b.json"
    bench.main(TINY + ["--data_dir", bench_data, "--out", str(out)] + (["--recompute"] if recompute else []))
    assert f"recompute {'on' if recompute else 'off'}" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["modes"]) == list(bench.MODES)
    for r in res["modes"].values():
        assert r["tokens_per_s"] > 0 and r["real_tokens"] > 0
    assert res["modes"]["single"]["real_tokens"] == res["modes"]["padded"]["real_tokens"] == res["n_tokens"] == 90
    assert 0 < res["modes"]["packed"]["fill"] <= 1 and 0 <= res["modes"]["padded"]["padding_fraction"] < 1
    assert res["env"]["command"].startswith("python bench.py --preset tiny")


def test_single_mode_compiles_once(tmp_path, monkeypatch, bench_data):
    # "eager": Dynamo's guards decide recompiles, without AOT tracing and code generation (fast on CPU);
    # with inductor on CPU single mode compiles once as well (checked by hand: too slow for a unit test)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    res = bench.main(TINY + ["--data_dir", bench_data, "--compile", "on", "--modes", "single",
                             "--out", str(tmp_path / "c.json")])
    r = res["modes"]["single"]
    assert r["distinct_lengths"] == 12
    assert r["compiles"] == 1 and r["recompiles_timed"] == 0


def test_ops_mode(tmp_path, capsys):
    """--ops on CPU (the ops are the references there): every row present and timed, floors positive."""
    out = tmp_path / "ops.json"
    argv = ["--ops", "--device", "cpu", "--widths", "8", "--seq_len", "16", "--batch_size", "2",
            "--max_tokens", "64", "--copy_gib", "0.001", "--out", str(out)]
    bench.main(argv)
    rows = json.loads(out.read_text())["ops"]
    keys = {(r["op"], r["impl"], r["pos"], r["pass"]) for r in rows}
    assert keys == {(o, i, p, s) for o in ("conv", "scan") for i in ("kernels", "ref") for p in ("packed", "none")
                    for s in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert "% floor" in capsys.readouterr().out
    bench.main(argv + ["--ops_impl", "kernels"])
    assert {r["impl"] for r in json.loads(out.read_text())["ops"]} == {"kernels"}
    for bad in ("kernel", ""):
        with pytest.raises(SystemExit):
            bench.main(["--ops", "--ops_impl", bad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ms_cuda():
    """bench.gpu_ms agrees with do_bench where the host cannot matter (a 256 MB copy, ~0.13 ms of GPU time,
    one launch); leaving out the flush's subtraction would add ~50% (a 256 MB zero), the / n would be off n-fold."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    graph_ms = bench.gpu_ms(lambda: dst.copy_(src))
    host_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    assert 0.85 < graph_ms / host_ms < 1.15, (graph_ms, host_ms)
