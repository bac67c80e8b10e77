"""Ticket auto-reply on realistic Nitro support tickets (eval/data/nitro_tickets.jsonl).

Prints the share routed auto vs human, the share of auto replies whose sources contain the
expected document, the wrong automatic replies (an automatic reply whose sources miss the
expected document, or to a ticket that must go to a human), routing accuracy on the tickets
that must go to a human, and tickets/minute on CPU with the embedded model.

    .venv/bin/python benchmarks/bench_tickets.py [--model NAME] [--out replies.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.corpus import nitro_index  # noqa: E402
from server.launch import local_server  # noqa: E402
from server.tickets_cli import read_tickets, reply_all  # noqa: E402

TICKETS = Path(__file__).resolve().parents[1] / "eval" / "data" / "nitro_tickets.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the served model (model.model)")
    ap.add_argument("--out", type=Path, help="keep the replies here (JSONL)")
    args = ap.parse_args()
    tickets = read_tickets(TICKETS)
    out = args.out or Path(tempfile.mkdtemp()) / "replies.jsonl"
    out.unlink(missing_ok=True)
    if args.model is None:
        from docqa.settings import load_settings

        args.model = load_settings().model.model
    with local_server(args.model, str(nitro_index())) as url:
        t0 = time.time()
        reply_all(tickets, out, url, progress=False)
        secs = time.time() - t0
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    auto = [t for t in tickets if recs[t["id"]]["decision"] == "auto"]
    human = [t for t in tickets if recs[t["id"]]["decision"] == "human"]
    right = [
        t
        for t in auto
        if t["expected_doc"] and t["expected_doc"] in [s["path"] for s in recs[t["id"]]["sources"]]
    ]
    wrong = [t for t in auto if t not in right]
    must_human = [t for t in tickets if t["expected"] == "human"]
    caught = [t for t in must_human if recs[t["id"]]["decision"] == "human"]
    answerable = [t for t in tickets if t["expected"] == "answer"]
    doc_any = [
        t
        for t in answerable
        if t["expected_doc"] in [s["path"] for s in recs[t["id"]].get("sources", [])]
    ]
    print(f"model {args.model}; {len(tickets)} tickets in {secs:.0f} s")
    print("| measure | value |\n|---|---|")
    print(f"| routed auto | {len(auto) / len(tickets):.2f} ({len(auto)}) |")
    print(f"| routed human | {len(human) / len(tickets):.2f} ({len(human)}) |")
    print(f"| auto replies citing the expected doc | {len(right) / max(1, len(auto)):.2f} |")
    print(f"| wrong automatic replies | {len(wrong)} {[t['id'] for t in wrong]} |")
    print(f"| out-of-scope/off-topic tickets sent to a human | {len(caught)}/{len(must_human)} |")
    print(
        f"| answerable tickets with the expected doc in sources | "
        f"{len(doc_any)}/{len(answerable)} |"
    )
    print(f"| tickets/minute (CPU, 2 cores) | {60 * len(tickets) / secs:.1f} |")
    for t in tickets:
        r = recs[t["id"]]
        print(
            f"  {t['id']}: {r['decision']:5s} conf={r.get('confidence', 0):.2f} "
            f"expected={t['expected']} reason={r.get('reason', r.get('error'))}"
        )


if __name__ == "__main__":
    main()
