"""Precomputed chunk KV caches (TurboRAG, EMNLP 2025) for grounded prompts.

A grounded prompt is ``prefix | [1] span_1 | \\n\\n[2] span_2 | ... | suffix``: the prefix is
the chat template's system turn and the user turn up to the excerpts (the same for every
grounded request under the same settings), ``span_i`` an excerpt's block without its number
(`` Heading\\ntext``: the number depends on the order, so it stays outside the cached span),
and the suffix the evidence lines, the question and the assistant header.

Each chunk's span is evaluated once after the prefix alone (so it attends to the system
prompt and to itself, not to the other excerpts) and its KV cells are saved per model and
prefix (``KVStore``). A request then:

1. in the engine's ``Assembler`` (a small context of its own): keeps the prefix from the last
   request (or evaluates it); for each excerpt loads the span's saved cells into a scratch
   sequence at their place, after the labels before it (positions moved and keys rotated
   in Python, ``moved``, as llama.cpp's K-shift would; or shifted by llama.cpp where the
   model's rope is not one ``Rope`` knows) and copies them into the prompt's sequence; then
   evaluates the labels
   (``[n]``: a few tokens each, attending to what precedes them),
2. copies the assembled cells into the request's sequence of the generating context,
3. prefills only the suffix there, then samples as usual.

A chunk whose cache entry is missing is computed on the spot (the same work as a plain
prefill of it) and saved: ingested documents need no rebuild. An entry that is truncated,
corrupt (sha256), or made for another model or prefix is logged and never loaded: the request
falls back to plain prefill (``docqa index kv`` rewrites it).

On disk (``<index_dir>.kv/<model fingerprint>-<prefix hash>/``, one mmap-able file per chunk,
written atomically: temp file + rename)::

    manifest.json            provenance: model, fingerprint, prefix tokens, llama_cpp version
    <chunk or unit id>.kv    b"DQKV1\\n" | u32 header length | header JSON | sequence state
    <unit id>.t<hash>.kv     a unit's tail (its tag), same format

The header holds the fingerprint, prefix hash, the entry's key, its tokens, start position
(a tail's starts after its unit), payload size and the payload's sha256.

The evidence layout (``retrieval.user_template`` without ``{context}``, the default) has no
excerpts in the prompt but evidence lines, ``prefix | unit_1 [n]\\n | unit_2 [n]\\n | ... |
suffix``: there the cached spans are the evidence units (sentences, list items, code blocks of
the chunks, as ``retrieval.evidence.units`` cuts them and ``retrieval.prompting.evidence_text``
shows them), keyed by a hash of their text (``unit_id``), each followed by its *tail*, the
line's tag `` [n]\\n``, cached per unit and tag (``<unit id>.t<tag hash>.kv``, evaluated after
the prefix and the unit alone): no label is left to evaluate per request, and with the
entries moved in Python nothing is left to decode but the recomputed tokens
(``retrieval.kv_recompute``). ``docqa index kv`` computes every unit of every chunk with its
tails for the tags ``[1]`` .. ``[top_k]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from docqa.provenance import make_provenance, sha256_file, write_provenance

log = logging.getLogger(__name__)

MAGIC = b"DQKV1\n"
FORMAT_VERSION = 1
_U8P = ctypes.POINTER(ctypes.c_uint8)


# -- keys ----------------------------------------------------------------------------------
def model_fingerprint(
    path: str | Path, params: dict | None = None, sha256: str | None = None
) -> str:
    """sha256 of the GGUF's own sha256 (``sha256``: the model store's provenance has it, else
    the whole file is read once per process), the llama.cpp build and the context parameters
    that shape the KV cells (types, flash attention): the cache's key. Any change to the
    weights gives another key (before session 24 only the size and the first and last 4 MiB
    were hashed: a finetune that changed only middle layers kept its base's caches)."""
    h = hashlib.sha256()
    digest = sha256 or file_sha256(path)
    h.update(f"{digest}\n{llama_cpp.__version__}\n{FORMAT_VERSION}\n".encode())
    h.update(json.dumps(params or {}, sort_keys=True).encode())
    return h.hexdigest()


_FILE_SHA: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """The file's sha256, kept per process by path, size and modification time."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_SHA:
        _FILE_SHA[key] = sha256_file(path)
    return _FILE_SHA[key]


def context_params() -> dict:
    """The context parameters that shape saved KV cells (``BatchContext`` uses the defaults)."""
    cp = llama_cpp.llama_context_default_params()
    return {"type_k": cp.type_k, "type_v": cp.type_v, "flash_attn": cp.flash_attn_type}


def tokens_hash(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def kv_root(retrieval) -> Path | None:
    """Where chunk caches live for ``RetrievalSettings`` ``retrieval``: ``kv_cache_dir``, else
    beside the index (``<index_dir>.kv``); None when the cache is off or there is no place."""
    if not retrieval.kv_cache:
        return None
    if not retrieval.shows_excerpts and not retrieval.evidence_units:
        log.warning(
            "retrieval.kv_cache is on but the prompt holds neither excerpts ({context}) nor "
            "evidence lines (evidence_units 0): nothing to cache: off"
        )
        return None
    if retrieval.kv_cache_dir is not None:
        return Path(retrieval.kv_cache_dir)
    if retrieval.index_dir is not None:
        d = Path(retrieval.index_dir)
        return d.parent / f"{d.name}.kv"
    log.info("retrieval.kv_cache: no index_dir or kv_cache_dir to keep caches in: off")
    return None


# -- the request's plan --------------------------------------------------------------------
@dataclass
class KVItem:
    chunk_id: str
    label: list[int]  # the separator and "[n]": evaluated per request
    span: list[int]  # " Heading\ntext": from the cache
    tail: list[int] = field(default_factory=list)  # " [n]\n" after an evidence unit: cached

    def key(self, tail: bool = False) -> str:
        """The cache entry of the span, or of its ``tail`` (one per unit and tag)."""
        return f"{self.chunk_id}.t{tokens_hash(self.tail)[:12]}" if tail else self.chunk_id


@dataclass
class KVPlan:
    prefix: list[int]
    items: list[KVItem]
    suffix: list[int]
    prefix_hash: str = ""
    # retrieval.kv_recompute: the first N tokens of every piece after the first, and its
    # tail, are evaluated again once the pieces are placed (``recompute_runs``)
    recompute: int = 0

    def __post_init__(self):
        self.prefix_hash = self.prefix_hash or tokens_hash(self.prefix)

    @property
    def tokens(self) -> list[int]:
        out = list(self.prefix)
        for it in self.items:
            out += it.label + it.span + it.tail
        return out + self.suffix


def prefix_text(rt, retrieval, marker: str = "\x00DOCQA-KV\x00") -> str | None:
    """The grounded prompt's text before the excerpts (the evidence lines in the evidence
    layout), for runtime ``rt`` and ``RetrievalSettings`` ``retrieval`` (no history, no extra
    system message)."""
    from retrieval.prompting import rag_messages

    r = retrieval
    if r.shows_excerpts:
        msgs = rag_messages(r.system_prompt, r.user_template, "?", [marker], examples=r.examples)
    else:
        msgs = rag_messages(
            r.system_prompt, r.user_template, "?", [], evidence=marker, examples=r.examples
        )
    text = rt.format_chat(msgs)
    i = text.find(marker)
    return text[:i] if i > 0 else None


def unit_id(text: str) -> str:
    """The cache key of an evidence unit shown as ``text`` (``evidence_text``)."""
    return "u-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def build_unit_plan(
    prompt: str,
    prefix_text: str,
    lines: list[tuple[str, str]],
    tokenize,
    prefix_tokens,
) -> KVPlan | None:
    """Cut the rendered ``prompt`` (evidence layout) into prefix, (unit, tail) per evidence
    line and suffix. ``lines``: (unit text as shown, its tag " [n]"), in prompt order; a
    unit's tail is its tag and the newline after it (cached per unit and tag, so no label is
    left to evaluate per request); a last tag not followed by a newline stays in the suffix.
    None when the prompt does not have that shape."""
    if not lines or not prompt.startswith(prefix_text):
        return None
    pos = len(prefix_text)
    items = []
    for i, (text, tag) in enumerate(lines):
        if not text or not prompt.startswith(text + tag, pos):
            return None
        pos += len(text)
        tail = tag + "\n"
        if not prompt.startswith(tail, pos):
            if i < len(lines) - 1:
                return None
            tail = ""
        items.append(KVItem(unit_id(text), [], tokenize(text), tokenize(tail) if tail else []))
        pos += len(tail)
    if any(not it.span for it in items):
        return None
    return KVPlan(prefix_tokens(prefix_text), items, tokenize(prompt[pos:]))


def build_plan(
    prompt: str,
    prefix_text: str,
    blocks: list[tuple[str, str, str]],
    tokenize,
    prefix_tokens,
) -> KVPlan | None:
    """Cut the rendered ``prompt`` into prefix, (label, span) per block and suffix.
    ``blocks``: (chunk id, label "[n]", block text "[n] Heading\\ntext"). None when the prompt
    does not have that shape (another prefix, a trimmed excerpt): plain prefill then."""
    if not blocks or not prompt.startswith(prefix_text):
        return None
    pos = len(prefix_text)
    items = []
    for cid, label, text in blocks:
        at = prompt.find(text, pos)
        if at < 0 or not text.startswith(label) or (not items and at != pos):
            return None
        between = prompt[pos:at]
        if items and between != "\n\n":
            return None
        span = text[len(label) :]
        items.append(KVItem(cid, tokenize(between + label), tokenize(span)))
        pos = at + len(text)
    if any(not it.span for it in items):
        return None
    return KVPlan(prefix_tokens(prefix_text), items, tokenize(prompt[pos:]))


def chunk_item(rt, chunk) -> KVItem:
    """The cached span of ``chunk`` (its block without the number), as ``build_plan`` cuts it."""
    from retrieval.prompting import block

    span = block(1, chunk)[len("[1]") :]
    return KVItem(chunk.id, [], rt.tokenize(span, add_bos=False, special=True))


def unit_items(rt, chunk) -> list[KVItem]:
    """The cached spans of ``chunk``'s evidence units, as ``build_unit_plan`` cuts them."""
    from retrieval.evidence import units
    from retrieval.prompting import evidence_text

    out = []
    for u in units(chunk.text):
        if u.kind == "heading":
            continue
        text = evidence_text(chunk.text[u.start : u.end])
        if text:
            out.append(KVItem(unit_id(text), [], rt.tokenize(text, add_bos=False, special=True)))
    return out


# -- the store -----------------------------------------------------------------------------
class BadEntry(ValueError):
    """A cache file that must not be loaded (truncated, corrupt, another model or prefix)."""


class KVStore:
    """Chunk caches of one model under ``root``; thread-safe (one writer per file via rename)."""

    def __init__(self, root: Path, fingerprint: str, model_id: str = ""):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.model_id = model_id
        self._lock = threading.Lock()
        self._manifests: set[Path] = set()
        self.loaded = self.computed = self.rejected = 0

    def dir_for(self, prefix_hash: str) -> Path:
        return self.root / f"{self.fingerprint[:16]}-{prefix_hash[:16]}"

    def path(self, prefix_hash: str, chunk_id: str) -> Path:
        return self.dir_for(prefix_hash) / f"{chunk_id}.kv"

    def read(self, plan: KVPlan, item: KVItem, tail: bool = False) -> np.ndarray | None:
        """The payload of ``item``'s span (its ``tail``: the cells after it), a read-only mmap;
        None when there is no entry; raises ``BadEntry`` when there is one that must not be
        loaded."""
        key = item.key(tail)
        p = self.path(plan.prefix_hash, key)
        try:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(len(MAGIC) + 4)
                if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                    raise BadEntry("not a docqa KV cache file")
                (n,) = struct.unpack("<I", head[len(MAGIC) :])
                raw = f.read(n)
                if len(raw) != n:
                    raise BadEntry("truncated header")
                hdr = json.loads(raw)
        except FileNotFoundError:  # none yet, or pruned meanwhile
            return None
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # unreadable: not loaded
            raise BadEntry(str(exc)) from exc
        if not isinstance(hdr, dict):
            raise BadEntry("the header is not a JSON object")
        off = len(MAGIC) + 4 + n
        want = {
            "fingerprint": self.fingerprint,
            "prefix_hash": plan.prefix_hash,
            "chunk_id": key,
            "start": len(plan.prefix) + (len(item.span) if tail else 0),
        }
        for k, v in want.items():
            if hdr.get(k) != v:
                raise BadEntry(f"{k} is {str(hdr.get(k))[:20]}, expected {str(v)[:20]}")
        if hdr.get("tokens") != (item.tail if tail else item.span):
            raise BadEntry("tail tokens differ" if tail else "span tokens differ")
        if size - off != hdr.get("size"):
            raise BadEntry(f"payload is {size - off} bytes, header says {hdr.get('size')}")
        try:
            data = np.memmap(p, dtype=np.uint8, mode="r", offset=off, shape=(size - off,))
        except FileNotFoundError:  # pruned since the header was read
            return None
        except (OSError, ValueError) as exc:
            raise BadEntry(str(exc)) from exc
        if hashlib.sha256(data).hexdigest() != hdr.get("sha256"):
            raise BadEntry("checksum mismatch")
        return data

    def write(self, plan: KVPlan, item: KVItem, payload: bytes, tail: bool = False) -> Path:
        d = self.dir_for(plan.prefix_hash)
        d.mkdir(parents=True, exist_ok=True)
        self._manifest(d, plan)
        key = item.key(tail)
        hdr = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "prefix_hash": plan.prefix_hash,
            "chunk_id": key,
            "start": len(plan.prefix) + (len(item.span) if tail else 0),
            "tokens": item.tail if tail else item.span,
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        raw = json.dumps(hdr).encode()
        out = self.path(plan.prefix_hash, key)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{out.name}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(raw)) + raw)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; caches are shared read-only
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    def _manifest(self, d: Path, plan: KVPlan) -> None:
        with self._lock:
            if d in self._manifests or (d / "manifest.json").is_file():
                self._manifests.add(d)
                return
            rec = make_provenance(
                "kvcache",
                inputs={"model": self.model_id, "prefix_tokens": plan.prefix},
                config={"fingerprint": self.fingerprint, "format_version": FORMAT_VERSION},
                prefix_hash=plan.prefix_hash,
            )
            write_provenance(d / "manifest.json", rec)
            self._manifests.add(d)


# -- llama.cpp side ------------------------------------------------------------------------
def _decode(bctx, tokens: list[int], start: int, seq: int, logits_last: bool, n_batch: int):
    for a in range(0, len(tokens), n_batch):
        part = tokens[a : a + n_batch]
        for i, t in enumerate(part):
            last = logits_last and a + i == len(tokens) - 1
            bctx.add(i, t, start + a + i, seq, last)
        bctx.batch.n_tokens = len(part)
        rc = llama_cpp.llama_decode(bctx.ctx, bctx.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")


@dataclass(frozen=True)
class Rope:
    """The model's rotary embedding, as llama.cpp's K-shift applies it: what moving cached keys
    to another position in Python needs (``moved``). Only plain rope (``NORM``: adjacent
    pairs, or ``NEOX``: halves) without YaRN or frequency factors; ``Assembler`` checks the
    result against llama.cpp's own shift once before using it."""

    head_dim: int
    n_rot: int
    freq_base: float
    freq_scale: float
    neox: bool

    @classmethod
    def of(cls, llm) -> Rope | None:
        """The rope of a loaded ``llama_cpp.Llama`` (None where it is not plain rope)."""
        model = llm.model
        kind = llama_cpp.llama_model_rope_type(model)
        if kind not in (llama_cpp.LLAMA_ROPE_TYPE_NORM, llama_cpp.LLAMA_ROPE_TYPE_NEOX):
            return None
        meta = llm.metadata
        arch = meta.get("general.architecture", "")
        if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
            return None
        n_head = llama_cpp.llama_model_n_head(model)
        head_dim = int(meta.get(f"{arch}.attention.key_length", 0)) or (
            llama_cpp.llama_model_n_embd(model) // max(1, n_head)
        )
        cp = llm.context_params
        return cls(
            head_dim=head_dim,
            n_rot=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
            freq_base=float(cp.rope_freq_base or meta.get(f"{arch}.rope.freq_base", 10000.0)),
            freq_scale=float(
                cp.rope_freq_scale or llama_cpp.llama_model_rope_freq_scale_train(model) or 1.0
            ),
            neox=kind == llama_cpp.LLAMA_ROPE_TYPE_NEOX,
        )


_KTYPES = {0: np.float32, 1: np.float16}  # ggml F32, F16


def _layout(blob: np.ndarray):
    """(cell metadata as (cells, 3) int32: pos, n_seq_id, seq id; keys as (layers, cells,
    n_embd_k)) views into a one-sequence llama.cpp state blob (u32 magic, i32 seq id, u32
    streams, u32 cells, the cells, u32 v_trans, u32 layers, then per layer i32 key type, u64
    row size and the rows), or None where the blob is not the plain layout ``moved`` knows
    (one stream, one sequence per cell, F16/F32 keys)."""
    if blob.size < 16:
        return None
    n_stream, n = (int(x) for x in np.ndarray((2,), np.uint32, blob, 8))
    off = 16 + 12 * n
    if n_stream != 1 or n == 0 or blob.size < off + 20:
        return None
    meta = np.ndarray((n, 3), np.int32, blob, 16, (12, 4))
    if (meta[:, 1] != 1).any():
        return None
    n_layer = int(np.ndarray((1,), np.uint32, blob, off + 4)[0])
    off += 8
    ktype = int(np.ndarray((1,), np.int32, blob, off)[0])
    row = int(np.ndarray((1,), np.uint64, blob, off + 4)[0])
    dt = _KTYPES.get(ktype)
    stride = 12 + n * row
    if dt is None or not n_layer or row % np.dtype(dt).itemsize:
        return None
    if off + n_layer * stride > blob.size:
        return None
    types = np.ndarray((n_layer,), np.int32, blob, off, (stride,))
    rows = np.ndarray((n_layer,), np.uint64, blob, off + 4, (stride,))
    if (types != ktype).any() or (rows != row).any():
        return None
    isz = np.dtype(dt).itemsize
    keys = np.ndarray((n_layer, n, row // isz), dt, blob, off + 12, (stride, row, isz))
    return meta, keys


def moved(payload, delta: int, rope: Rope) -> np.ndarray | None:
    """A copy of a cached sequence state (``payload``) ``delta`` positions later: the cells'
    positions moved and the keys rotated by ``delta`` (RoPE composes: rotating a key made at
    p by delta gives the key at p + delta), as llama.cpp's K-shift would, without its pass
    over every cell of the cache at the next decode. None where the layout is not known."""
    out = np.array(payload, dtype=np.uint8, copy=True)
    lay = _layout(out)
    if lay is None:
        return None
    meta, keys = lay
    n_embd = keys.shape[2]
    if n_embd % rope.head_dim or rope.n_rot > rope.head_dim or rope.n_rot % 2:
        return None
    meta[:, 0] += delta
    half = rope.n_rot // 2
    theta = delta * rope.freq_scale * rope.freq_base ** (-2.0 * np.arange(half) / rope.n_rot)
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    k = keys.reshape(keys.shape[0], keys.shape[1], n_embd // rope.head_dim, rope.head_dim)
    if not np.may_share_memory(k, out):  # a copy: writing it would not move the keys
        return None
    r = k[..., : rope.n_rot].astype(np.float32)
    if rope.neox:
        x0, x1 = r[..., :half], r[..., half:]
    else:
        x0, x1 = r[..., 0::2], r[..., 1::2]
    y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    if rope.neox:
        k[..., :half], k[..., half : rope.n_rot] = y0, y1
    else:
        k[..., 0 : rope.n_rot : 2], k[..., 1 : rope.n_rot : 2] = y0, y1
    return out


def _state(bctx, seq: int) -> bytes:
    """The cells of ``seq`` as llama.cpp sequence state."""
    n = llama_cpp.llama_state_seq_get_size(bctx.ctx, seq)
    buf = (ctypes.c_uint8 * n)()
    w = llama_cpp.llama_state_seq_get_data(bctx.ctx, buf, n, seq)
    if w != n:
        raise RuntimeError(f"llama_state_seq_get_data wrote {w} of {n} bytes")
    return bytes(buf)


def compute_span(bctx, src: int, scratch: int, n_prefix: int, span: list[int], n_batch: int):
    """Evaluate ``span`` on ``scratch`` after the first ``n_prefix`` cells of ``src`` (the
    prefix); -> the span's cells as llama.cpp sequence state. Leaves the span's cells (only)
    in ``scratch``."""
    mem = bctx.mem
    llama_cpp.llama_memory_seq_rm(mem, scratch, -1, -1)
    llama_cpp.llama_memory_seq_cp(mem, src, scratch, 0, n_prefix)
    _decode(bctx, span, n_prefix, scratch, False, n_batch)
    llama_cpp.llama_memory_seq_rm(mem, scratch, 0, n_prefix)
    return _state(bctx, scratch)


def compute_tail(
    bctx, src: int, scratch: int, aux: int, n_prefix: int, n_span: int, tail, n_batch: int
):
    """Evaluate ``tail`` on ``scratch``, which holds a span's cells (at ``n_prefix``..), after
    the first ``n_prefix`` cells of ``src`` and the span; -> the tail's cells (only) as
    sequence state (made on ``aux``, left empty). Leaves span and tail in ``scratch``."""
    mem = bctx.mem
    llama_cpp.llama_memory_seq_cp(mem, src, scratch, 0, n_prefix)
    _decode(bctx, tail, n_prefix + n_span, scratch, False, n_batch)
    llama_cpp.llama_memory_seq_rm(mem, scratch, 0, n_prefix)
    llama_cpp.llama_memory_seq_rm(mem, aux, -1, -1)
    llama_cpp.llama_memory_seq_cp(mem, scratch, aux, n_prefix + n_span, -1)
    try:
        return _state(bctx, aux)
    finally:
        llama_cpp.llama_memory_seq_rm(mem, aux, -1, -1)


def _load_span(bctx, scratch: int, payload) -> bool:
    llama_cpp.llama_memory_seq_rm(bctx.mem, scratch, -1, -1)
    arr = np.ascontiguousarray(payload)
    r = llama_cpp.llama_state_seq_set_data(bctx.ctx, arr.ctypes.data_as(_U8P), arr.size, scratch)
    return r == arr.size


def _read(store: KVStore, plan: KVPlan, it: KVItem, tail: bool = False):
    """``store.read``, with a bad entry logged and counted (raises ``BadEntry`` on)."""
    try:
        return store.read(plan, it, tail)
    except BadEntry as exc:
        store.rejected += 1
        log.warning(
            "chunk KV cache %s ignored (%s): plain prefill",
            store.path(plan.prefix_hash, it.key(tail)),
            exc,
        )
        raise


def check(store: KVStore, plan: KVPlan) -> list[tuple] | None:
    """Every cached (span, tail) payload of ``plan`` (None where none yet, or no tail); None
    when any entry is bad (logged): the request then takes plain prefill, nothing is
    loaded."""
    out = []
    for it in plan.items:
        try:
            span = _read(store, plan, it)
            out.append((span, _read(store, plan, it, True) if it.tail else None))
        except BadEntry:
            return None
    return out


def _place(
    bctx, seq, scratch, aux, plan: KVPlan, it: KVItem, payloads, store, n_batch: int, strict=False
):
    """Fill ``scratch`` with ``it``'s span and tail at their cached positions (loaded from
    ``payloads``, or computed after ``seq``'s prefix and saved where None; a failed write is
    logged and passed over, or raised when ``strict``)."""
    payload, tpay = payloads
    n_prefix = len(plan.prefix)
    if payload is None:
        blob = compute_span(bctx, seq, scratch, n_prefix, it.span, n_batch)
        _save(store, plan, it, blob, False, strict)
        store.computed += 1
    else:
        if not _load_span(bctx, scratch, payload):
            raise RuntimeError(f"llama.cpp refused the KV cache of chunk {it.chunk_id}")
        store.loaded += 1
    if not it.tail:
        return
    if tpay is None:
        blob = compute_tail(bctx, seq, scratch, aux, n_prefix, len(it.span), it.tail, n_batch)
        _save(store, plan, it, blob, True, strict)
        store.computed += 1
    else:
        try:
            if not _load_span(bctx, aux, tpay):
                raise RuntimeError(f"llama.cpp refused the KV cache of {it.key(True)}")
            llama_cpp.llama_memory_seq_cp(bctx.mem, aux, scratch, -1, -1)
        finally:
            llama_cpp.llama_memory_seq_rm(bctx.mem, aux, -1, -1)
        store.loaded += 1


def _save(store: KVStore, plan: KVPlan, it: KVItem, blob: bytes, tail: bool, strict: bool):
    try:
        store.write(plan, it, blob, tail)
    except OSError as exc:
        if strict:
            raise
        log.warning("could not save the KV cache %s: %s", it.key(tail), exc)


def stitch(
    bctx,
    seq: int,
    scratch: int,
    label_seq: int,
    plan: KVPlan,
    store: KVStore,
    payloads: list,
    n_have: int,
    n_batch: int,
    rope: Rope | None = None,
    n_labels: int = 1,
) -> int:
    """Fill ``seq`` with the plan's prefix (its first ``n_have`` cells are there already), its
    spans and tails (loaded from ``payloads``, or computed and saved where None) and its
    labels; the rest (``plan.tokens[n:]``: the suffix, and a last recomputed run) is left to
    the caller. -> cells filled (n). Raises on a llama.cpp failure
    (the caller clears ``seq`` and falls back).

    Every span is placed first and the labels are evaluated afterwards (``_labels``, on
    ``label_seq``): llama.cpp applies the shifts of all spans in one pass over the cache, at
    that decode, instead of one per label. Each label still attends to everything before
    it. With no label (the evidence layout: each unit's tag is its cached tail) a one-token
    decode on ``label_seq`` applies the shifts (``llama_state_seq_get_data`` would copy
    cells whose keys are not rotated yet). With ``rope`` a cached entry is moved to its
    place before it is loaded (``moved``), so no shift is left for llama.cpp to apply: its
    pass over every cell of the context costs ~14 ms on 2 cores for the assembler's 768.
    ``n_labels`` sequences from ``label_seq`` on are free: the recomputed runs go through
    llama.cpp that many at a time (``_recompute``)."""
    mem = bctx.mem
    prefix = plan.prefix
    _decode(bctx, prefix[n_have:], n_have, seq, False, n_batch)
    n_past = len(prefix)
    labels: list[tuple[list[int], int]] = []  # (label, position)
    shifted = False
    for it, pay in zip(plan.items, payloads):
        if it.label:
            labels.append((it.label, n_past))
        n_past += len(it.label)
        delta = n_past - len(prefix)
        at = len(prefix)
        cached = pay[0] is not None and (pay[1] is not None or not it.tail)
        if rope is not None and delta and cached:  # moved before it is loaded
            mv = moved(pay[0], delta, rope)
            mt = moved(pay[1], delta, rope) if it.tail else None
            if mv is not None and (mt is not None or not it.tail):
                pay, at, delta = (mv, mt), n_past, 0
        _place(bctx, seq, scratch, label_seq, plan, it, pay, store, n_batch)
        if rope is not None and delta:  # computed just now: its cells moved the same way
            mv = moved(np.frombuffer(_state(bctx, scratch), dtype=np.uint8), delta, rope)
            if mv is not None and _load_span(bctx, scratch, mv):
                at, delta = n_past, 0
        n = len(it.span) + len(it.tail)
        lo = llama_cpp.llama_memory_seq_pos_min(mem, scratch)
        hi = llama_cpp.llama_memory_seq_pos_max(mem, scratch)
        if lo != at or hi != at + n - 1:
            raise RuntimeError(f"chunk {it.chunk_id}: cells at {lo}..{hi}, expected a span")
        if delta:
            llama_cpp.llama_memory_seq_add(mem, scratch, 0, -1, delta)
            shifted = True
        llama_cpp.llama_memory_seq_cp(mem, scratch, seq, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, scratch, -1, -1)
        n_past += n
    if labels:
        _labels(bctx, seq, labels, label_seq, n_batch)
    runs = recompute_runs(plan)
    if runs and runs[-1][1] + len(runs[-1][0]) == n_past:
        # the last run (the last line's tag) ends where the suffix starts: its cells are
        # dropped, and the caller evaluates it with the suffix (``plan.tokens[n_past:]``), in
        # the decode it runs anyway: the same attention, one small decode fewer
        at = runs.pop()[1]
        llama_cpp.llama_memory_seq_rm(bctx.mem, seq, at, -1)
        n_past = at
    if runs:  # each decode applies pending shifts first
        room = llama_cpp.llama_n_ctx(bctx.ctx) - n_past  # free cells: the scratch's, at least
        _recompute(bctx, seq, runs, range(label_seq, label_seq + n_labels), n_batch, room)
    elif not labels and shifted:
        try:  # any token, alone on the empty label sequence: the shifts are applied first
            _decode(bctx, prefix[:1], 0, label_seq, False, n_batch)
        finally:
            llama_cpp.llama_memory_seq_rm(mem, label_seq, -1, -1)
    return n_past


def recompute_runs(plan: KVPlan) -> list[tuple[list[int], int]]:
    """(tokens, position) of what ``plan.recompute`` evaluates again in a stitched prompt:
    the first ``recompute`` tokens of every piece after the first and that piece's tail.
    A cached piece attends only to the prefix and itself; these tokens then attend to the
    pieces before them too (CacheBlend, Yao et al. 2025, recomputes a few tokens per chunk
    the same way). The first piece is computed right after the prefix, as plain prefill
    would: nothing to redo."""
    if plan.recompute <= 0:
        return []
    runs: list[tuple[list[int], int]] = []

    def add(toks: list[int], pos: int) -> None:
        if runs and runs[-1][1] + len(runs[-1][0]) == pos:  # contiguous: one decode
            runs[-1] = (runs[-1][0] + toks, runs[-1][1])
        elif toks:
            runs.append((list(toks), pos))

    at = len(plan.prefix)
    for i, it in enumerate(plan.items):
        at += len(it.label)
        if i:
            add(it.span[: plan.recompute], at)
            add(it.tail, at + len(it.span))
        at += len(it.span) + len(it.tail)
    return runs


def _recompute(
    bctx, seq: int, runs: list[tuple[list[int], int]], lseqs, n_batch: int, room: int | None = None
):
    """Evaluate ``runs`` again in ``seq`` (their cells there are replaced), as many at once as
    there are free sequences in ``lseqs``: each run on one of them, holding ``seq``'s cells
    before it. A run sees the runs before it in their cached form when they share its decode,
    recomputed otherwise. (llama.cpp takes a sequence's new tokens only right after its last
    cell, so runs that see each other recomputed need a decode each; one decode for all costs
    ~5 ms less per request on 2 cores, and moves the next-token distribution from plain
    prefill's by 0.040 KL per answer token instead of 0.039, docs/benchmarks.md.)

    A run's cached cells stay until its decode ends (the later runs' sequences hold them), so
    the runs sharing a decode take at most ``room`` tokens (the context's free cells) besides
    the batch's ``n_batch``; a run alone needs none."""
    lseqs = list(lseqs)
    assert lseqs, "no label sequence"
    cap = n_batch if room is None else max(0, min(n_batch, room))  # 0: one run per decode
    group: list[tuple[list[int], int]] = []
    for run in runs:
        if len(run[0]) > n_batch:  # longer than a batch: alone, in parts (``_decode``)
            _decode_runs(bctx, seq, group, lseqs)
            llama_cpp.llama_memory_seq_rm(bctx.mem, seq, run[1], run[1] + len(run[0]))
            _labels(bctx, seq, [run], lseqs[0], n_batch)
            group = []
            continue
        if len(group) == len(lseqs) or sum(len(t) for t, _ in group) + len(run[0]) > cap:
            _decode_runs(bctx, seq, group, lseqs)
            group = []
        group.append(run)
    _decode_runs(bctx, seq, group, lseqs)


def _decode_runs(bctx, seq: int, group: list[tuple[list[int], int]], lseqs: list[int]):
    """One decode of ``group`` (runs of at most a batch in all), run i on ``lseqs[i]``."""
    if not group:
        return
    mem = bctx.mem
    try:
        for (_, at), ls in zip(group, lseqs):
            llama_cpp.llama_memory_seq_rm(mem, ls, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, seq, ls, 0, at)
        n = 0
        for (toks, at), ls in zip(group, lseqs):
            llama_cpp.llama_memory_seq_rm(mem, seq, at, at + len(toks))  # the cached cells
            for j, t in enumerate(toks):
                bctx.add(n, t, at + j, ls, False)
                n += 1
        bctx.batch.n_tokens = n
        rc = llama_cpp.llama_decode(bctx.ctx, bctx.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        for (toks, at), ls in zip(group, lseqs):
            llama_cpp.llama_memory_seq_cp(mem, ls, seq, at, at + len(toks))
    finally:
        for ls in lseqs[: len(group)]:
            llama_cpp.llama_memory_seq_rm(mem, ls, -1, -1)


def _labels(bctx, seq: int, labels: list[tuple[list[int], int]], lseq: int, n_batch: int):
    """Evaluate ``labels`` ((tokens, position) in ``seq``, whose spans are placed), in order,
    each on ``lseq`` holding ``seq``'s cells before it (llama.cpp wants a sequence's new
    tokens right after its last cell), and give ``seq`` the result. One label per decode: a
    label must see the labels before it (evaluated together, each blind to the others, the
    135M model lost the excerpt numbering and cited "[4]" of three)."""
    mem = bctx.mem
    try:
        for toks, at in labels:
            llama_cpp.llama_memory_seq_rm(mem, lseq, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, seq, lseq, 0, at)
            _decode(bctx, toks, at, lseq, False, n_batch)
            llama_cpp.llama_memory_seq_cp(mem, lseq, seq, at, at + len(toks))
    finally:
        llama_cpp.llama_memory_seq_rm(mem, lseq, -1, -1)


def warm(bctx, seq: int, scratch: int, aux: int, plan: KVPlan, store: KVStore, n_batch: int):
    """Compute and save every span and tail of ``plan`` that has no valid entry (bad ones
    rewritten); ``seq`` must hold the prefix. -> (spans written, tails written)."""
    spans = tails = 0

    def valid(it, tail=False):
        try:
            return store.read(plan, it, tail)
        except BadEntry as exc:
            log.info("rewriting the KV cache %s (%s)", it.key(tail), exc)
            return None

    for it in plan.items:
        payload = valid(it)
        tpay = valid(it, True) if it.tail else None
        if payload is not None and (tpay is not None or not it.tail):
            continue
        _place(bctx, seq, scratch, aux, plan, it, (payload, tpay), store, n_batch, strict=True)
        llama_cpp.llama_memory_seq_rm(bctx.mem, scratch, -1, -1)
        spans += payload is None
        tails += bool(it.tail) and tpay is None
    return spans, tails


class Assembler:
    """Puts stitched prompts together in a small llama.cpp context of its own, then hands the
    result to the context that generates (``install``).

    Placing a cached span at its position shifts its cells, and llama.cpp applies shifts in a
    pass over *every* cell of the cache at the next decode: ~0.14 s on 2 cores for an 8k-cell
    cache, 0.7 s for the batch engine's (n_parallel + 2) x n_ctx cells, more than the prefill
    it saves. Here the cache holds only one prompt and the span being loaded, sized to the
    prompts seen (powers of two from ``MIN_CELLS``: 768 cells for the evidence layout's ~250
    token prompts, where the pass costs ~10 ms; it grows for a longer prompt, up to
    ``PROMPT_CELLS`` + ``SCRATCH_CELLS``); all shifts of a request are applied in one pass
    (``stitch``), and the generating context receives cells already in place
    (``llama_state_seq_get/set_data``: a copy, no shift). Even that pass (~14 ms here) is
    left out where ``moved`` does the rotation (``Rope``, checked once against llama.cpp's
    shift per assembler). Sequence 0 keeps the last prefix
    between requests (prompt reuse). Used from one engine thread; created on first use."""

    MAIN, SCRATCH, LABEL = 0, 1, 2
    LABELS = 8  # sequences from LABEL on: labels, a tail being loaded, recomputed runs
    PROMPT_CELLS = 2048  # prefix, labels and spans; a longer stitched prompt: plain prefill
    SCRATCH_CELLS = 1024  # the span (and tail) being loaded or computed; longer: plain prefill
    MIN_CELLS = (512, 256)  # the smallest (prompt, scratch) context

    def __init__(self, llm, store: KVStore):
        self.llm = llm
        self.store = store
        self.bctx = None
        self.cells = (0, 0)  # (prompt, scratch) cells of the current context
        self.prefix: list[int] = []
        try:
            self.rope = Rope.of(llm)
        except Exception:  # noqa: BLE001 - an unknown model: llama.cpp's own shift
            log.debug("no rope description for this model", exc_info=True)
            self.rope = None
        self.rope_checked = False

    @staticmethod
    def need(plan: KVPlan) -> tuple[int, int]:
        """(prompt cells, scratch cells) that stitching ``plan`` takes: prefix, labels, spans
        and tails, plus the shift-applying token; the longest span with its tail."""
        n = len(plan.prefix) + sum(len(it.label) + len(it.span) + len(it.tail) for it in plan.items)
        return n + 1, max((len(it.span) + len(it.tail) for it in plan.items), default=0)

    def _context(self, plan: KVPlan):
        want = tuple(
            max(lo, 1 << max(0, n - 1).bit_length())
            for lo, n in zip(self.MIN_CELLS, self.need(plan))
        )
        if self.bctx is not None and all(w <= c for w, c in zip(want, self.cells)):
            return self.bctx
        from server.generation import BatchContext

        self.close()
        self.cells = tuple(max(w, c) for w, c in zip(want, self.cells))
        self.bctx = BatchContext(
            self.llm,
            1,
            self.llm.n_batch,
            self.llm.n_threads,
            extra_seqs=self.LABELS,  # from LABEL on
            n_cells=sum(self.cells),
        )
        log.info("chunk-KV assembly context created: %d + %d cells", *self.cells)
        return self.bctx

    def fits(self, plan: KVPlan) -> bool:
        n, span = self.need(plan)
        return n <= self.PROMPT_CELLS and span <= self.SCRATCH_CELLS

    def install(self, plan: KVPlan, ctx, seq: int) -> int | None:
        """Stitch ``plan`` (prefix, labels, spans, tails) and copy its cells into sequence
        ``seq`` of the llama.cpp context ``ctx`` (emptied first) -> cells filled, or None: a
        cache entry is bad, the prompt does not fit, or llama.cpp failed (logged; ``seq`` left
        empty, the caller runs plain prefill)."""
        if not self.fits(plan):
            return None
        try:
            payloads = check(self.store, plan)
        except Exception:  # noqa: BLE001 - a cache that cannot be read is a cache miss
            log.exception("chunk KV caches unreadable: plain prefill")
            return None
        if payloads is None:
            return None
        try:
            bctx = self._context(plan)
        except Exception:
            log.exception("could not create the chunk-KV assembly context: plain prefill")
            return None
        mem = bctx.mem
        n_have = len(plan.prefix) if self.prefix == plan.prefix else 0
        llama_cpp.llama_memory_seq_rm(mem, self.MAIN, n_have, -1)
        llama_cpp.llama_memory_seq_rm(mem, self.SCRATCH, -1, -1)
        gen_mem = llama_cpp.llama_get_memory(ctx)
        try:
            n_past = stitch(
                bctx,
                self.MAIN,
                self.SCRATCH,
                self.LABEL,
                plan,
                self.store,
                payloads,
                n_have,
                self.llm.n_batch,
                self._checked_rope(bctx, plan),
                self.LABELS,
            )
            buf = np.frombuffer(_state(bctx, self.MAIN), dtype=np.uint8)
            llama_cpp.llama_memory_seq_rm(gen_mem, seq, -1, -1)
            if (
                llama_cpp.llama_state_seq_set_data(ctx, buf.ctypes.data_as(_U8P), buf.size, seq)
                != buf.size
            ):
                raise RuntimeError("llama.cpp refused the stitched prompt's cells")
        except Exception:
            log.exception("stitching chunk KV caches failed: plain prefill")
            self.prefix = []
            llama_cpp.llama_memory_seq_rm(mem, self.MAIN, -1, -1)
            llama_cpp.llama_memory_seq_rm(gen_mem, seq, -1, -1)
            return None
        finally:
            llama_cpp.llama_memory_seq_rm(mem, self.SCRATCH, -1, -1)
        self.prefix = list(plan.prefix)
        # keep the prefix for the next request
        llama_cpp.llama_memory_seq_rm(mem, self.MAIN, len(self.prefix), -1)
        return n_past

    def _checked_rope(self, bctx, plan: KVPlan) -> Rope | None:
        """``self.rope`` once cells moved by ``moved`` have matched llama.cpp's own shift of
        the same cells (checked once, on the prefix's first tokens evaluated on the scratch
        sequence; None from a mismatch on: llama.cpp shifts)."""
        if self.rope is None or self.rope_checked:
            return self.rope
        if not plan.prefix:  # nothing to check it on yet: llama.cpp shifts
            return None
        self.rope_checked = True
        delta, mem, ok = 37, bctx.mem, False
        try:
            _decode(bctx, plan.prefix[:8], 0, self.SCRATCH, False, self.llm.n_batch)
            cells = np.frombuffer(_state(bctx, self.SCRATCH), dtype=np.uint8)
            llama_cpp.llama_memory_seq_add(mem, self.SCRATCH, 0, -1, delta)
            _decode(bctx, plan.prefix[:1], 0, self.LABEL, False, 1)  # applies the shift
            a = _layout(np.frombuffer(_state(bctx, self.SCRATCH), dtype=np.uint8))
            mine = moved(cells, delta, self.rope)
            b = _layout(mine) if mine is not None else None
            if a is not None and b is not None and a[1].shape == b[1].shape:
                ka, kb = a[1].astype(np.float32), b[1].astype(np.float32)
                err = float(np.abs(ka - kb).max())
                same = bool((a[0][:, 0] == b[0][:, 0]).all())
                ok = same and err <= 1e-3 * float(np.abs(ka).max()) + 1e-3
                log.info("cached keys moved in Python: max difference %.2g from llama.cpp", err)
        except Exception:  # noqa: BLE001 - any doubt: llama.cpp's own shift
            log.debug("checking the rope rotation failed", exc_info=True)
        finally:
            llama_cpp.llama_memory_seq_rm(mem, self.SCRATCH, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, self.LABEL, -1, -1)
        if not ok:
            log.warning("cached keys cannot be moved in Python for this model: llama.cpp shifts")
            self.rope = None
        return self.rope

    def close(self) -> None:
        if self.bctx is not None:
            self.bctx.close()
            self.bctx = None
            self.prefix = []


class KVRunner:
    """The single engine's stitched path: a generating context of its own (one sequence of
    n_ctx cells) that receives the prompts its ``Assembler`` stitches; both created on the
    first grounded request with a plan. Runs in the engine's worker thread."""

    MAIN = 0

    def __init__(self, llm, store: KVStore):
        self.llm = llm
        self.store = store
        self.assembler = Assembler(llm, store)
        self.bctx = None
        self._rng = np.random.default_rng()

    def _context(self):
        if self.bctx is None:
            from server.generation import BatchContext

            self.bctx = BatchContext(
                self.llm, 1, self.llm.n_batch, self.llm.n_threads, n_cells=self.llm.n_ctx()
            )
        return self.bctx

    def generate(self, p, cancel=None):
        """Generation of ``p`` with its ``kv_plan`` stitched; None when the plan's caches are
        not usable (the caller runs plain prefill)."""
        from server.generation import token_loop

        try:
            bctx = self._context()
        except Exception:  # noqa: BLE001 - e.g. out of memory: plain prefill still works
            log.exception("could not create the chunk-KV generation context: plain prefill")
            return None
        n_past = self.assembler.install(p.kv_plan, bctx.ctx, self.MAIN)
        if n_past is None:
            return None
        max_tokens = min(p.max_tokens, bctx.per_seq_ctx - len(p.prompt_tokens))
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        return token_loop(self.llm, p, self._tokens(bctx, p, n_past, seed), max_tokens, cancel)

    def _tokens(self, bctx, p, n_past: int, seed: int):
        from server.generation import logits_at, sampler_chain

        n_vocab = self.llm.n_vocab()
        chain = sampler_chain(bctx.vocab, p, seed)
        try:
            rest = p.kv_plan.tokens[n_past:]  # the suffix (and a last recomputed run)
            _decode(bctx, rest, n_past, self.MAIN, True, self.llm.n_batch)
            pos = n_past + len(rest)
            while True:
                tok = llama_cpp.llama_sampler_sample(chain, bctx.ctx, -1)
                yield tok, (logits_at(bctx.ctx, -1, n_vocab) if p.logprobs else None)
                _decode(bctx, [tok], pos, self.MAIN, True, 1)
                pos += 1
        finally:
            llama_cpp.llama_sampler_free(chain)
            llama_cpp.llama_memory_seq_rm(bctx.mem, self.MAIN, -1, -1)

    def close(self) -> None:
        self.assembler.close()
        if self.bctx is not None:
            self.bctx.close()
            self.bctx = None


_TAIL_SUFFIX = re.compile(r"\.t[0-9a-f]{12}$")
_TMP_STALE_S = 3600.0  # a temporary entry file this old belongs to no write in progress


def prune(d: Path, keep: set[str], units: bool) -> int:
    """Delete the entries of ``d`` that are not in ``keep`` (entry keys: spans, and tails in
    the evidence layout): those of deleted or changed documents, and tails of tags no longer
    used (a lower ``top_k``). Only entries of one layout: evidence units (``u-``) when
    ``units``, else chunks (two layouts may share a prefix). ``d`` is per model and prefix,
    not per index: indexes sharing a ``kv_cache_dir`` prune each other's entries (recomputed
    on use); the default, ``<index>.kv``, is one per index. -> files deleted."""
    n = 0
    for f in d.glob("*.kv") if d.is_dir() else []:
        key = f.name[: -len(".kv")]
        if _TAIL_SUFFIX.sub("", key).startswith("u-") == units and key not in keep:
            f.unlink(missing_ok=True)
            n += 1
    # a writer killed mid-write leaves its hidden temporary file (``.<key>.kv.tmp-*``): never
    # loaded, but never renamed either; gone once it is older than any write in progress
    old = time.time() - _TMP_STALE_S
    for f in d.glob(".*.kv.tmp-*") if d.is_dir() else []:
        with contextlib.suppress(OSError):
            if f.stat().st_mtime < old:
                f.unlink()
                n += 1
    return n


def build_cache(rt, retrieval, chunks, progress: bool = True) -> dict:
    """Compute and save the KV of every chunk of ``chunks`` that has no valid entry yet, for
    runtime ``rt`` (its ``kv`` store) and the grounded prefix of ``retrieval`` (in the
    evidence layout: every unit, and its tail for each tag ``[1]`` .. ``[top_k]``), then
    delete the entries of spans no longer in ``chunks`` (``prune``). -> figures."""
    import time

    from server.generation import BatchContext

    if rt.kv is None:
        raise ValueError("the runtime has no chunk KV store (retrieval.kv_cache is off)")
    text = prefix_text(rt, retrieval)
    if text is None:
        raise ValueError("the grounded template has neither {context} nor {evidence}")
    prefix = rt.prompt_tokens(text)
    if retrieval.shows_excerpts:
        groups = [[chunk_item(rt, c)] for c in chunks]
    else:  # the evidence layout: every unit of every chunk once, with each tail
        from retrieval.prompting import evidence_tag

        tails = [
            rt.tokenize(evidence_tag(n) + "\n", add_bos=False, special=True)
            for n in range(1, retrieval.top_k + 1)
        ]
        seen: dict[str, KVItem] = {}
        for c in chunks:
            for it in unit_items(rt, c):
                seen.setdefault(it.chunk_id, it)
        groups = [[KVItem(u.chunk_id, [], u.span, t) for t in tails] for u in seen.values()]
    t0 = time.perf_counter()
    bctx = BatchContext(rt.llm, 1, rt.llm.n_batch, rt.llm.n_threads, extra_seqs=1)
    written = tails_written = tokens = 0
    try:
        _decode(bctx, prefix, 0, 0, False, rt.llm.n_batch)
        it = groups
        if progress:
            from tqdm import tqdm

            it = tqdm(groups, desc="chunk KV", unit="span")
        for group in it:
            tokens += len(group[0].span)
            spans, tails_n = warm(bctx, 0, 1, 2, KVPlan(prefix, group, []), rt.kv, rt.llm.n_batch)
            written += spans
            tails_written += tails_n
    finally:
        bctx.close()
    d = rt.kv.dir_for(tokens_hash(prefix))
    items = [it for g in groups for it in g]
    keep = {it.key() for it in items} | {it.key(True) for it in items if it.tail}
    pruned = prune(d, keep, units=not retrieval.shows_excerpts)
    size = sum(f.stat().st_size for f in d.glob("*.kv")) if d.is_dir() else 0
    return {
        "dir": str(d),
        "chunks": len(chunks),
        "spans": len(groups),
        "written": written,
        "tails_written": tails_written,
        "pruned": pruned,
        "span_tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": size,
    }
