"""Document loaders: Markdown/MDX, plain text, YAML/JSON (OpenAPI rendered as readable text).

A binary file is skipped with a warning; a file that fails to load is reported and skipped,
never aborting the build.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

TEXT_EXT = {".md", ".markdown", ".mdx", ".txt", ".rst"}
DATA_EXT = {".yaml", ".yml", ".json"}
SUPPORTED = TEXT_EXT | DATA_EXT


@dataclass
class Document:
    path: str  # relative to the docs root, with '/' separators
    text: str  # Markdown-ish text
    title: str = ""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def is_binary(raw: bytes) -> bool:
    return b"\x00" in raw[:8192]


# spaces and tabs, never \s where it could also run over newlines: each pattern below stays
# linear in an uploaded file's size (\s* at every line start was quadratic in blank lines)
_FRONT = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*\n", re.S)
_MDX_LINE = re.compile(r"^[ \t]*(import|export)[ \t].*$", re.M)
_JSX_TAG = re.compile(r"</?[A-Z][A-Za-z0-9.]*(\s[^<>]*)?/?>")


def _drop_comments(text: str) -> str:
    """``text`` without its HTML comments; an unclosed one stays (as a regex left it, but in
    linear time: ``<!--.*?-->`` rescanned to the end from every unclosed opener)."""
    out, i = [], 0
    while (a := text.find("<!--", i)) >= 0:
        b = text.find("-->", a + 4)
        if b < 0:
            break
        out.append(text[i:a])
        i = b + 3
    out.append(text[i:])
    return "".join(out)


def _markdown(text: str, mdx: bool) -> tuple[str, str]:
    title = ""
    m = _FRONT.match(text)
    if m:
        try:
            meta = yaml.safe_load(m.group(1)) or {}
            if isinstance(meta, dict):
                title = str(meta.get("title") or "")
        except yaml.YAMLError:
            pass
        text = text[m.end() :]
    text = _drop_comments(text)
    if mdx:
        text = _MDX_LINE.sub("", text)
        text = _JSX_TAG.sub("", text)
    if not title:
        h = re.search(r"^#[ \t]+(.+)$", text, re.M)
        title = h.group(1).strip() if h else ""
    return text, title


def _schema_props(schema: dict, depth: int = 0) -> list[str]:
    lines = []
    if not isinstance(schema, dict) or depth > 2:
        return lines
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        desc = " ".join(str(prop.get("description", "")).split())
        typ = prop.get("type", "object")
        default = f" (default: {prop['default']})" if "default" in prop else ""
        lines.append(f"{'  ' * depth}- `{name}` ({typ}){default}: {desc}".rstrip(": "))
        lines += _schema_props(prop, depth + 1)
    return lines


def render_openapi(spec: dict) -> str:
    info = spec.get("info") or {}
    out = [f"# {info.get('title', 'API')} (OpenAPI)", str(info.get("description", "")).strip()]
    for url in spec.get("servers") or []:
        if isinstance(url, dict) and url.get("url"):
            out.append(f"Server URL: {url['url']}")
    for path, methods in (spec.get("paths") or {}).items():
        if not isinstance(methods, dict):
            continue
        for method, op in methods.items():
            if not isinstance(op, dict):
                continue
            out.append(f"\n## {method.upper()} {path}")
            for key in ("summary", "description"):
                if op.get(key):
                    out.append(" ".join(str(op[key]).split()))
            body = ((op.get("requestBody") or {}).get("content") or {}).get(
                "application/json"
            ) or {}
            schema = body.get("schema") or {}
            if "$ref" in schema:
                out.append(f"Request body: {schema['$ref'].split('/')[-1]}")
            out += _schema_props(schema)
    for name, schema in ((spec.get("components") or {}).get("schemas") or {}).items():
        out.append(f"\n## Schema {name}")
        if isinstance(schema, dict) and schema.get("description"):
            out.append(" ".join(str(schema["description"]).split()))
        out += _schema_props(schema)
    return "\n".join(x for x in out if x is not None)


def _data(text: str, suffix: str) -> tuple[str, str]:
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    if isinstance(data, dict) and ("openapi" in data or "swagger" in data) and "paths" in data:
        rendered = render_openapi(data)
        return rendered, str((data.get("info") or {}).get("title", ""))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True), ""


def load_file(path: Path, rel: str) -> Document:
    raw = path.read_bytes()
    if is_binary(raw):
        raise ValueError("binary file")
    text = raw.decode("utf-8")
    suffix = path.suffix.lower()
    if suffix in DATA_EXT:
        body, title = _data(text, suffix)
    elif suffix in {".md", ".markdown", ".mdx"}:
        body, title = _markdown(text, mdx=suffix == ".mdx")
    else:
        body, title = text, ""
    return Document(rel, body, title or Path(rel).stem)


def iter_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def load_tree(
    root: str | Path, report: LoadReport | None = None, within: Path | None = None
) -> list[Document]:
    """The documents under ``root`` (a folder or one file). With ``within``, a file whose real
    path (symbolic links followed) is outside that folder is skipped: a link inside an allowed
    root must not ingest what lies outside it."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"docs folder not found: {root}")
    report = report if report is not None else LoadReport()
    base = root.parent if root.is_file() else root
    docs = []
    for p in iter_files(root):
        rel = p.relative_to(base).as_posix()
        if within is not None and within != p.resolve() and within not in p.resolve().parents:
            log.warning("skipping %s: a link to a file outside %s", rel, within)
            report.skipped.append((rel, "links outside the allowed root"))
            continue
        if p.suffix.lower() not in SUPPORTED:
            try:
                binary = is_binary(p.read_bytes()[:8192])
            except OSError:
                binary = True
            reason = "binary file" if binary else f"unsupported type {p.suffix or '(none)'}"
            log.warning("skipping %s: %s", rel, reason)
            report.skipped.append((rel, reason))
            continue
        try:
            doc = load_file(p, rel)
        except Exception as exc:  # noqa: BLE001 - report and go on
            log.warning("skipping %s: %s", rel, exc)
            report.skipped.append((rel, str(exc)))
            continue
        if not doc.text.strip():
            report.skipped.append((rel, "empty"))
            continue
        docs.append(doc)
        report.loaded.append(rel)
    return docs
