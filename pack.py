"""
pack.py: text -> tiktoken ids -> documents packed into fixed-length rows -> shards on disk,
plus the reader for those shards (Shard, open_split, pad_documents, read_meta).

    python pack.py                                   # default corpus: this Python's standard library
    python pack.py --input my_texts/ more.jsonl      # your data: .txt = one document per file,
                                                     # .jsonl = one document per line ({"text": ...})
    python pack.py --help                            # all options and their defaults

A document is [EOT, t1, ..., tn]. A row holds seq_len+1 tokens (inputs row[:L], targets row[1:]);
documents sit back to back in a row, the unused tail is EOT padding (targets -1, its own segment).
Documents longer than a row are cut into pieces of at most L tokens, each starting with EOT.
Rows are filled by best-fit decreasing, then shuffled. Output in --out_dir: {split}_{k:03d}.bin shards
(format below) and meta.json, written last.

Shard format (little-endian, each section aligned to 64 bytes):
    header (256 bytes): magic b"PKMAMBA1", version int32, token width int32 (2 or 4 bytes),
        vocab_size int32, eot int32, seq_len int32, n_rows int64, n_docs int64, n_bounds int64,
        encoding name (32 bytes, NUL padded), offsets (int64) of row_ptr, cu and tokens
    row_ptr int64 (n_rows+1)   row r's cu_seqlens are cu[row_ptr[r]:row_ptr[r+1]]
    cu      int32 (n_bounds)   [0, s1, ..., used]: document starts inside the row, then the used length
    tokens  uint16/uint32 (n_rows, seq_len+1)
"""

import argparse
import ast
import bisect
import io
import json
import multiprocessing
import os
import re
import struct
import sys
import sysconfig
import time
import tokenize
import warnings

import numpy as np
import tiktoken
from tqdm import tqdm

MAGIC = b"PKMAMBA1"
VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
HEADER = struct.Struct("<8s5i3q32s3q")  # magic, version, width, vocab, eot, seq_len, n_rows, n_docs, n_bounds, name, offsets
SHARD_RE = re.compile(r"^(train|val)_\d{3,}\.bin$")


class PackError(Exception):
    """A user-facing error of pack.py: main prints it as one line and exits != 0."""


def batch_rows(tokens, cus, seq_len):
    """Packed rows (b, L+1) and their cu_seqlens [0, s1, ..., used] -> x (b, L) int64, y (b, L) int64
    with -1 on padding, pos (b, L) int32 (offset inside the document; the padding tail is its own segment)."""
    L = seq_len
    row = np.asarray(tokens, np.int64)  # (b, L+1)
    x, y = row[:, :L], row[:, 1:].copy()
    counts = np.array([len(c) for c in cus])
    which = np.repeat(np.arange(len(cus)), counts)  # (n,) batch row of each boundary
    bounds = np.concatenate(cus).astype(np.int64)  # (n,) [0, s1, ..., used] per row, concatenated
    used = bounds[np.cumsum(counts) - 1]  # (b,)
    t = np.arange(L)
    y[t[None, :] >= used[:, None]] = -1
    # every boundary < L starts a segment: the documents, and the padding tail at `used` if there is one
    start = np.zeros((len(cus), L), np.int64)  # (b, L)
    keep = bounds < L
    start[which[keep], bounds[keep]] = bounds[keep]
    pos = t - np.maximum.accumulate(start, axis=1)  # offset from the latest segment start
    return x, y, pos.astype(np.int32)


class ShardError(Exception):
    """A user-facing error of the shard reader."""


# -----------------------------------------------------------------------------
# tokenizer

def byte_encoding():
    """256 byte tokens + <|endoftext|> = 256: needs no download, works everywhere."""
    return tiktoken.Encoding(
        name="byte",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",  # gpt2's split
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )


def load_encoding(name):
    """-> (encoding, actual name). Falls back to bytes (with a warning) when `name` can't be loaded."""
    if name == "byte":
        return byte_encoding(), "byte"
    if name not in tiktoken.list_encoding_names():
        raise PackError(f"unknown encoding {name!r}; use byte or one of {', '.join(tiktoken.list_encoding_names())}")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # no network and no cache: requests' ConnectionError, or whatever the download raises
        print(f"pack.py: warning: could not load tiktoken encoding {name!r} ({type(e).__name__}); "
              f"falling back to the byte encoding (vocab 257)", file=sys.stderr)
        return byte_encoding(), "byte"
    return enc, name


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


# -----------------------------------------------------------------------------
# corpus: tasks are (path, kind, start, end) byte ranges of files; a worker turns one into documents

def stdlib_files():
    """The .py files of this interpreter's standard library, sorted walk, site-packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))  # test/ stays in
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return root, files


def python_documents(src):
    """One document per top-level function or class of a module's source, decorators included."""
    with warnings.catch_warnings():  # invalid escape sequences etc. in old code are not our business
        warnings.simplefilter("ignore")
        tree = ast.parse(src)
    lines = src.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # the line numbering ast uses
    docs = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            docs.append("\n".join(lines[start - 1:node.end_lineno]))  # whole lines: a trailing `; x = 1` comes along
    return docs


def input_tasks(paths):
    """--input paths -> tasks. Folders are walked sorted for .txt/.jsonl; big .jsonl files are split
    at line ends so that one file still keeps all workers busy."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith((".txt", ".jsonl"))]
        elif os.path.isfile(p):
            if not p.endswith((".txt", ".jsonl")):
                raise PackError(f"--input {p}: unsupported file type; give .txt (one document per file), "
                                f".jsonl (one document per line, field 'text') or a folder of those")
            files.append(p)
        else:
            raise PackError(f"--input {p}: no such file or folder; check the path")
    tasks = []
    for f in files:
        size = os.path.getsize(f)
        if f.endswith(".txt"):
            tasks.append((f, "txt", 0, size))
            continue
        with open(f, "rb") as fh:
            start = 0
            while start < size:
                fh.seek(min(start + (16 << 20), size))
                fh.readline()
                tasks.append((f, "jsonl", start, fh.tell()))
                start = fh.tell()
    return tasks


_enc = None  # set in each tokenizer process by _init_worker


def _init_worker(enc):
    global _enc
    _enc = enc


def tokenize_task(task):
    """-> (documents [EOT, t...] as arrays, skipped files, skipped jsonl lines). Empty texts are dropped."""
    path, kind, start, end = task
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    texts, bad_files, bad_lines = [], 0, 0
    if kind == "jsonl":
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):  # bad JSON or UTF-8, no "text" field
                text = None
            if isinstance(text, str):
                texts.append(text)
            else:
                bad_lines += 1
    else:
        try:
            if kind == "python":
                coding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)  # honour `# -*- coding` cookies
                texts = python_documents(raw.decode(coding))
            else:
                texts = [raw.decode("utf-8")]
        except (UnicodeDecodeError, SyntaxError, ValueError, LookupError):
            bad_files = 1
    docs = []
    dtype = token_dtype(_enc.n_vocab)
    for text in texts:
        ids = _enc.encode_ordinary(text)
        if ids:
            doc = np.empty(len(ids) + 1, dtype)
            doc[0] = _enc.eot_token
            doc[1:] = ids
            docs.append(doc)
    return docs, bad_files, bad_lines


def tokenize_all(tasks, enc, workers):
    """Tokenize every task, in order, with `workers` processes. -> (docs, skipped files, skipped lines)."""
    docs, bad_files, bad_lines = [], 0, 0
    bar = tqdm(total=sum(t[3] - t[2] for t in tasks), unit="B", unit_scale=True, desc="tokenize")
    if workers > 1:
        pool = multiprocessing.Pool(workers, _init_worker, (enc,))
        results = pool.imap(tokenize_task, tasks, chunksize=max(1, len(tasks) // (workers * 32)))
    else:
        pool = None
        _init_worker(enc)
        results = map(tokenize_task, tasks)
    try:
        for task, (d, bf, bl) in zip(tasks, results):
            docs += d
            bad_files += bf
            bad_lines += bl
            bar.update(task[3] - task[2])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return docs, bad_files, bad_lines


# -----------------------------------------------------------------------------
# packing

def cut_document(doc, seq_len):
    """[EOT, t1..tn] longer than seq_len -> pieces [EOT] + next seq_len-1 tokens; shorter ones as they are."""
    if len(doc) <= seq_len:
        return [doc]
    eot, text = doc[:1], doc[1:]
    return [np.concatenate([eot, text[i:i + seq_len - 1]]) for i in range(0, len(text), seq_len - 1)]


def best_fit_decreasing(lengths, capacity):
    """Bin packing: longest first, each into the open row with the least room that still fits it.
    Open rows are bucketed by free room (0..capacity), the non-empty buckets kept in a sorted list,
    so a lookup is one bisect. -> list of rows, each a list of indices into `lengths`."""
    lengths = [int(n) for n in lengths]
    assert all(1 <= n <= capacity for n in lengths)
    rows = []
    room = [[] for _ in range(capacity + 1)]  # room[c]: open rows with c free tokens
    free = []  # sorted c with room[c] non-empty
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect.bisect_left(free, n)
        if k == len(free):
            r, c = len(rows), capacity
            rows.append([])
        else:
            c = free[k]
            r = room[c].pop()
            if not room[c]:
                del free[k]
        rows[r].append(i)
        c -= n
        if c > 0:  # full rows are forgotten
            if not room[c]:
                bisect.insort(free, c)
            room[c].append(r)
    return rows


def assemble_rows(docs, row_docs, seq_len, eot):
    """Rows of document indices -> tokens (n_rows, seq_len+1) padded with EOT, and per-row cu_seqlens."""
    tokens = np.full((len(row_docs), seq_len + 1), eot, docs[0].dtype if docs else np.int64)
    cu = []
    for r, ids in enumerate(row_docs):
        offsets = np.zeros(len(ids) + 1, np.int32)
        offsets[1:] = np.cumsum([len(docs[i]) for i in ids])
        for i, s in zip(ids, offsets):
            tokens[r, s:s + len(docs[i])] = docs[i]
        cu.append(offsets)
    return tokens, cu


def pack_documents(docs, seq_len, eot, rng=None):
    """Documents [EOT, t...] -> (tokens (n_rows, seq_len+1), cu list). Long documents are cut first.
    Rows are shuffled when an np.random.Generator is given."""
    pieces = [p for d in docs for p in cut_document(d, seq_len)]
    row_docs = best_fit_decreasing([len(p) for p in pieces], seq_len)
    if rng is not None:
        row_docs = [row_docs[i] for i in rng.permutation(len(row_docs))]
    return assemble_rows(pieces, row_docs, seq_len, eot)


# -----------------------------------------------------------------------------
# shard files

def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(n_rows, n_bounds, seq_len, width):
    """-> offsets of row_ptr, cu, tokens and the file size."""
    off_ptr = HEADER_BYTES
    off_cu = _align(off_ptr + 8 * (n_rows + 1))
    off_tok = _align(off_cu + 4 * n_bounds)
    return off_ptr, off_cu, off_tok, off_tok + n_rows * (seq_len + 1) * width


def write_shard(path, tokens, cu, vocab_size, eot, encoding):
    """Write one shard to a temporary name next to `path`, then rename it into place."""
    n_rows, seq_len = tokens.shape[0], tokens.shape[1] - 1
    dtype = token_dtype(vocab_size)
    row_ptr = np.zeros(n_rows + 1, "<i8")
    row_ptr[1:] = np.cumsum([len(c) for c in cu])
    n_bounds = int(row_ptr[-1])
    off_ptr, off_cu, off_tok, size = _layout(n_rows, n_bounds, seq_len, dtype.itemsize)
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, vocab_size, eot, seq_len, n_rows, n_bounds - n_rows,
                         n_bounds, encoding.encode(), off_ptr, off_cu, off_tok)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for off, blob in [(0, header), (off_ptr, row_ptr.tobytes()),
                              (off_cu, np.concatenate(cu).astype("<i4").tobytes()),
                              (off_tok, np.ascontiguousarray(tokens, dtype).tobytes())]:
                f.write(b"\0" * (off - f.tell()) + blob)
            assert f.tell() == size
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Shard:
    """One shard file, validated and memory-mapped (tokens are not read until used)."""

    def __init__(self, path):
        self.path = path
        fix = "re-run `python pack.py --overwrite` with your options to rebuild it"
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise ShardError(f"{path}: cannot read: {e.strerror}") from None
        if head[:8] != MAGIC:
            raise ShardError(f"{path}: not a packmamba shard (magic {head[:8]!r}, expected {MAGIC!r}); {fix}")
        if len(head) < HEADER.size:
            raise ShardError(f"{path}: truncated: file has {size} bytes, less than the header; {fix}")
        (_, version, width, self.vocab_size, self.eot, self.seq_len, self.n_rows, self.n_docs, n_bounds,
         name, *offsets) = HEADER.unpack(head[:HEADER.size])
        if version != VERSION:
            raise ShardError(f"{path}: shard format version {version}, this reader reads version {VERSION}; {fix}")
        self.encoding = name.rstrip(b"\0").decode()
        layout = _layout(self.n_rows, n_bounds, self.seq_len, width)
        if (width != token_dtype(self.vocab_size).itemsize or self.n_rows < 1 or self.seq_len < 1
                or n_bounds != self.n_docs + self.n_rows or list(offsets) != list(layout[:3])):
            raise ShardError(f"{path}: corrupt header (width {width}, vocab {self.vocab_size}, rows {self.n_rows}, "
                             f"docs {self.n_docs}, bounds {n_bounds}, offsets {offsets}); {fix}")
        if size != layout[3]:
            raise ShardError(f"{path}: {'truncated' if size < layout[3] else 'too long'}: header says "
                             f"{layout[3]} bytes, file has {size}; {fix}")
        self.row_ptr = np.memmap(path, "<i8", "r", offsets[0], (self.n_rows + 1,))
        self.cu = np.memmap(path, "<i4", "r", offsets[1], (n_bounds,))
        self.tokens = np.memmap(path, token_dtype(self.vocab_size), "r", offsets[2], (self.n_rows, self.seq_len + 1))

    def __repr__(self):
        return f"Shard({self.path!r}, rows={self.n_rows}, docs={self.n_docs}, seq_len={self.seq_len})"

    def cu_seqlens(self, r):
        return np.asarray(self.cu[self.row_ptr[r]:self.row_ptr[r + 1]])

    def rows(self, idx):
        """Row indices -> x (b, L) int64, y (b, L) int64 with -1 on padding, pos (b, L) int32."""
        idx = np.asarray(idx, np.int64)
        return batch_rows(self.tokens[idx], [self.cu_seqlens(r) for r in idx], self.seq_len)

    def documents(self):
        """Every stored document (pieces of cut ones count as documents), in row order, int64."""
        docs = []
        for r in range(self.n_rows):
            row, cu = np.asarray(self.tokens[r], np.int64), self.cu_seqlens(r)
            docs += [row[a:b] for a, b in zip(cu[:-1], cu[1:])]
        return docs


def shard_names(data_dir, split):
    """The file names of the {split}_NNN.bin shards in data_dir, in shard order ([] if none)."""
    if not os.path.isdir(data_dir):
        return []
    return sorted((f for f in os.listdir(data_dir) if SHARD_RE.match(f) and f.startswith(split + "_")),
                  key=lambda f: int(f[len(split) + 1:-4]))


def open_split(data_dir, split):
    """All {split}_*.bin of data_dir, in shard order; they must agree on tokenizer and row length."""
    names = shard_names(data_dir, split)
    if not names:
        raise ShardError(f"no {split} shards in {data_dir}: run `python pack.py --out_dir {data_dir}` first")
    shards = [Shard(os.path.join(data_dir, f)) for f in names]
    for s in shards[1:]:
        a, b = shards[0], s
        if (a.encoding, a.vocab_size, a.eot, a.seq_len) != (b.encoding, b.vocab_size, b.eot, b.seq_len):
            raise ShardError(f"{b.path} ({b.encoding}, vocab {b.vocab_size}, seq_len {b.seq_len}) does not match "
                             f"{a.path} ({a.encoding}, vocab {a.vocab_size}, seq_len {a.seq_len}): shards of two "
                             f"runs are mixed; re-run `python pack.py --overwrite --out_dir {data_dir}`")
    return shards


def pad_documents(docs, eot, length=None):
    """Each document alone, padded: x = doc then EOT, y = doc[1:] + [EOT] then -1. -> x, y (n, Lp) int64."""
    Lp = length or max(len(d) for d in docs)
    x = np.full((len(docs), Lp), eot, np.int64)
    y = np.full((len(docs), Lp), -1, np.int64)
    for i, d in enumerate(docs):
        if len(d) > Lp:
            raise ValueError(f"document {i} has {len(d)} tokens, more than length={Lp}")
        x[i, :len(d)] = d
        y[i, :len(d) - 1] = d[1:]
        y[i, len(d) - 1] = eot
    return x, y


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ShardError(f"no meta.json in {data_dir}: run `python pack.py --out_dir {data_dir}` first") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable ({e}); re-run `python pack.py --overwrite --out_dir {data_dir}`") from None


# -----------------------------------------------------------------------------
# the whole run

def previous_run(out_dir):
    """Files of an earlier run in out_dir: shards and meta.json, nothing else."""
    return sorted(f for f in os.listdir(out_dir) if SHARD_RE.match(f) or f == "meta.json")


def pack_split(name, docs, args, enc, rng):
    """Cut, pack, shuffle and write one split. -> its entry of meta.json."""
    L = args.seq_len
    pieces = [p for d in docs for p in cut_document(d, L)]
    row_docs = best_fit_decreasing([len(p) for p in pieces], L)
    row_docs = [row_docs[i] for i in rng.permutation(len(row_docs))]
    shards = []
    with tqdm(total=len(row_docs), unit="row", desc=f"write {name}") as bar:
        for k, lo in enumerate(range(0, len(row_docs), args.shard_rows)):
            tokens, cu = assemble_rows(pieces, row_docs[lo:lo + args.shard_rows], L, enc.eot_token)
            shards.append(f"{name}_{k:03d}.bin")
            write_shard(os.path.join(args.out_dir, shards[-1]), tokens, cu, enc.n_vocab, enc.eot_token, enc.name)
            bar.update(len(tokens))
    n_tokens = sum(len(p) for p in pieces)
    return {"n_docs": len(docs), "n_pieces": len(pieces), "n_tokens": n_tokens, "n_rows": len(row_docs),
            "fill": n_tokens / (len(row_docs) * L) if row_docs else 0.0,
            "n_cut_docs": sum(len(d) > L for d in docs), "shards": shards}


def build(args):
    """Run pack.py with parsed args. -> meta dict. Raises PackError on bad input, before writing anything."""
    t0 = time.time()
    if args.seq_len < 16:
        raise PackError(f"--seq_len {args.seq_len} is too small; use at least 16 (default 2048)")
    if not 0 <= args.val_fraction < 1:
        raise PackError(f"--val_fraction {args.val_fraction} must be in [0, 1)")
    if args.shard_rows < 1 or args.workers < 1:
        raise PackError("--shard_rows and --workers must be at least 1")
    if args.input:
        tasks = input_tasks(args.input)
        source = "files: " + ", ".join(args.input)
    else:
        root, files = stdlib_files()
        tasks = [(f, "python", 0, os.path.getsize(f)) for f in files]
        source = f"python stdlib {root}: one document per top-level function/class"
    enc, enc_name = load_encoding(args.encoding)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, ".pack_write_test"), "w"):
            pass
        os.remove(os.path.join(args.out_dir, ".pack_write_test"))
    except OSError as e:
        raise PackError(f"cannot write to --out_dir {args.out_dir} ({e.strerror}); pick another folder") from None
    old = previous_run(args.out_dir)
    if old and not args.overwrite:
        raise PackError(f"{args.out_dir} already holds another run ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}); "
                        f"pass --overwrite to replace it or pick another --out_dir")

    docs, bad_files, bad_lines = tokenize_all(tasks, enc, args.workers)
    if not docs:
        raise PackError(f"no documents in {source} (.txt files, .jsonl lines with a 'text' field; empty texts "
                        f"are skipped); check --input")

    # split by document, before any cutting or packing
    rng = np.random.default_rng(args.seed)
    n = len(docs)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * args.val_fraction)))
    is_val = np.zeros(n, bool)
    is_val[rng.permutation(n)[:n_val]] = True

    for f in ["meta.json"] + old:  # meta first: shards without meta.json never pass for a finished run
        if os.path.exists(os.path.join(args.out_dir, f)):
            os.remove(os.path.join(args.out_dir, f))
    splits = {}
    for name, mask in [("train", ~is_val), ("val", is_val)]:
        splits[name] = pack_split(name, [d for d, m in zip(docs, mask) if m], args, enc, rng)

    lengths = np.array([len(d) for d in docs])
    n_rows = sum(s["n_rows"] for s in splits.values())
    n_tokens = sum(s["n_tokens"] for s in splits.values())
    meta = {
        "format_version": VERSION, "input": source, "encoding": enc_name, "requested_encoding": args.encoding,
        "vocab_size": enc.n_vocab, "eot": enc.eot_token, "seq_len": args.seq_len,
        "token_bytes": token_dtype(enc.n_vocab).itemsize, "seed": args.seed, "val_fraction": args.val_fraction,
        "shard_rows": args.shard_rows, "n_docs": n, "n_pieces": sum(s["n_pieces"] for s in splits.values()),
        "n_tokens": n_tokens, "n_rows": n_rows, "fill": n_tokens / (n_rows * args.seq_len),
        "n_cut_docs": int((lengths > args.seq_len).sum()),
        "cut_token_share": float(lengths[lengths > args.seq_len].sum() / lengths.sum()),
        "doc_tokens_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (10, 50, 90, 99)}
                                  | {"max": int(lengths.max())},
        "skipped_files": bad_files, "skipped_lines": bad_lines, "splits": splits,
    }
    tmp = os.path.join(args.out_dir, ".meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(args.out_dir, "meta.json"))

    p = meta["doc_tokens_percentiles"]
    print(f"input     {source}")
    if bad_files or bad_lines:
        print(f"skipped   {bad_files} files that could not be decoded/parsed, {bad_lines} bad .jsonl lines")
    print(f"encoding  {enc_name} (vocab {enc.n_vocab}, eot {enc.eot_token}), seq_len {args.seq_len}")
    print(f"documents {n:,} (train {splits['train']['n_docs']:,}, val {splits['val']['n_docs']:,}); "
          f"tokens per document p10 {p['p10']} p50 {p['p50']} p90 {p['p90']} p99 {p['p99']} max {p['max']}")
    print(f"cut       {meta['n_cut_docs']:,} documents longer than seq_len, "
          f"{meta['cut_token_share']:.1%} of the tokens; {meta['n_pieces']:,} documents/pieces stored")
    print(f"tokens    {n_tokens:,} in {n_rows:,} rows (train {splits['train']['n_rows']:,}, "
          f"val {splits['val']['n_rows']:,}); fill {meta['fill']:.3%}")
    print(f"wrote     {len(splits['train']['shards']) + len(splits['val']['shards'])} shards + meta.json "
          f"to {args.out_dir} in {time.time() - t0:.1f}s")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", default=None,
                        help=".txt/.jsonl files or folders of them; None: this Python's standard library")
    parser.add_argument("--out_dir", default="data", help="where shards and meta.json go")
    parser.add_argument("--seq_len", type=int, default=2048, help="row length L (rows hold L+1 tokens)")
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding name, or byte")
    parser.add_argument("--val_fraction", type=float, default=0.005, help="share of documents held out")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--seed", type=int, default=1337, help="for the split and the row shuffle")
    parser.add_argument("--shard_rows", type=int, default=8192, help="rows per shard file at most")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in out_dir")
    args = parser.parse_args(argv)
    try:
        build(args)
    except PackError as e:
        print(f"pack.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
