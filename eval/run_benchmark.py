"""`make eval`: the dev suite for a model with and without RAG; writes the table into
docs/benchmarks.md between the eval markers.

    .venv/bin/python -m eval.run_benchmark [--model NAME_OR_GGUF ...] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from eval.suite import SuiteConfig, evaluate_model, table
from retrieval.corpus import nitro_index

START, END = "<!-- eval:start -->", "<!-- eval:end -->"


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{START}\n{body}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--write", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("var/eval.json"))
    ap.add_argument("--qa-limit", type=int, default=40)
    ap.add_argument("--mcq-limit", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    index = str(nitro_index())
    cfg = SuiteConfig(qa_limit=args.qa_limit, mcq_limit=args.mcq_limit, mcq_rounds=args.rounds)
    rows = []
    for model in args.model or ["smollm2-135m-instruct"]:
        for rag in (False, True):
            rows.append(evaluate_model(model, rag=rag, index=index, cfg=cfg))
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    cmd = "make eval  # = .venv/bin/python -m eval.run_benchmark --write docs/benchmarks.md"
    body = (
        f"Command: `{cmd}`. Dev split: 34 grounded-fact questions (eval/data), the first "
        f"{args.qa_limit} held-out Q&A pairs, 30 off-topic questions, {args.mcq_limit} dev "
        f"MCQ questions x {args.rounds} rounds at temperature 0.1 (letter protocol).\n\n{md}"
    )
    print(md)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    if args.write:
        write_section(args.write, body)


if __name__ == "__main__":
    main()
