"""Calibrate the abstain threshold: best dense similarity of in-corpus (held-out Q&A) vs
off-topic questions; pick the threshold with the best balanced accuracy.

    .venv/bin/python -m eval.calibrate [--index DIR]

``--index``: an index built with another embedder (e.g. one `docqa train embedder` made): the
threshold is a cosine similarity, so it moves with the embedder.
"""

from __future__ import annotations

import numpy as np


def calibrate(in_sims: list[float], off_sims: list[float]) -> dict:
    best = None
    for t in np.arange(0.0, 0.8, 0.01):
        keep = np.mean(np.asarray(in_sims) >= t)  # in-corpus answered
        abstain = np.mean(np.asarray(off_sims) < t)  # off-topic abstained
        bal = (keep + abstain) / 2
        if best is None or bal > best["balanced_accuracy"] + 1e-9:
            best = {
                "threshold": round(float(t), 2),
                "in_corpus_answered": float(keep),
                "offtopic_abstained": float(abstain),
                "balanced_accuracy": float(bal),
            }
    return best


def main() -> None:
    import argparse
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--index", default=None, help="index directory (default: the Nitro index)")
    args = ap.parse_args()

    logging.disable(logging.WARNING)
    from docqa.data import load_qa, split_qa
    from docqa.settings import load_settings
    from eval.qa import load_offtopic
    from retrieval.corpus import nitro_index
    from retrieval.factory import build_retriever

    ret = build_retriever(args.index or nitro_index(), load_settings())
    _, held = split_qa(load_qa())
    in_sims = [ret.search(p.question, 1).best_sim for p in held]
    off_sims = [ret.search(q, 1).best_sim for q in load_offtopic()]
    res = calibrate(in_sims, off_sims)
    print(
        f"in-corpus: n={len(in_sims)} best-sim p5={np.percentile(in_sims, 5):.3f} "
        f"median={np.median(in_sims):.3f}; off-topic: n={len(off_sims)} "
        f"max={max(off_sims):.3f} median={np.median(off_sims):.3f}"
    )
    print(
        f"threshold {res['threshold']}: in-corpus answered {res['in_corpus_answered']:.3f}, "
        f"off-topic abstained {res['offtopic_abstained']:.3f}"
    )
    for t in (0.2, 0.25, 0.3):
        r = calibrate_at(in_sims, off_sims, t)
        print(f"  at {t}: in-corpus answered {r[0]:.3f}, off-topic abstained {r[1]:.3f}")


def calibrate_at(in_sims, off_sims, t):
    return float(np.mean(np.asarray(in_sims) >= t)), float(np.mean(np.asarray(off_sims) < t))


if __name__ == "__main__":
    main()
