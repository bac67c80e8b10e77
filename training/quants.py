"""The ``quant_select`` step: several llama.cpp quants of one model, and the one to serve
(issue 19 item 3, "the fastest quant that keeps quality").

The model (an HF folder: the ``base`` step's fp32 dequantization of the embedded Q4_1 GGUF,
or a finetuned one) is converted once to an F32 GGUF and quantized to each of ``quants``
(``<QUANT>.gguf``, each with a provenance JSON beside it). Each quant and the reference (the
published model, ``quality.against``) gets its prefill and decode speed measured with
llama.cpp (eval.speed) and the gate's evaluation (training.gate.evaluate). A quant keeps
quality when the gate's rule passes against the reference (no metric worse by more than the
margin) and its grounded facts are not significantly worse (exact McNemar p < alpha); of the
reference and the quants that keep quality, the fastest prefill is chosen (:func:`choose`).
The chosen GGUF is the step's ``model.gguf``: the reference's own file when no quant keeps
quality or none is faster, so publishing it never serves a worse model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from training.artifacts import PROV, finish, step_dir
from training.config import QuantSelectStep
from training.gate import METRICS, decide
from training.registry import Need, StepContext, register

log = logging.getLogger(__name__)

FLOAT = ("F32", "F16", "BF16")  # outtypes of the converter itself, no llama.cpp quantization


def export_quants(model: Path, out_dir: Path, quants: list[str]) -> dict[str, Path]:
    """Convert the HF folder ``model`` once to an F32 GGUF and make ``out_dir/<QUANT>.gguf`` for
    each quant, with a provenance JSON beside each (source, quant, size, sha256). The F32
    intermediate is removed. Returns ``{QUANT: path}`` in the order given."""
    from docqa.provenance import make_provenance, sha256_file, write_provenance
    from training.export import convert_to_gguf, quantize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [q.upper() for q in quants]
    if len(set(names)) != len(names):
        raise ValueError(f"a quant is listed twice: {quants}")
    f32 = out_dir / "model.f32.gguf"
    files: dict[str, Path] = {}
    try:
        for name in names:
            dst = out_dir / f"{name}.gguf"
            if name in FLOAT:
                convert_to_gguf(model, dst, name.lower())
            else:
                if not f32.is_file():
                    convert_to_gguf(model, f32, "f32")
                quantize(f32, dst, name)
            size = dst.stat().st_size
            write_provenance(
                dst.with_suffix(".json"),
                make_provenance(
                    "training.quant",
                    inputs={"model": str(model)},
                    config={"quant": name},
                    metrics={"size_bytes": size},
                    quant=name,
                    sha256=sha256_file(dst),
                ),
            )
            log.info("%s: %.1f MB", dst.name, size / 1e6)
            files[name] = dst
    finally:
        f32.unlink(missing_ok=True)
    return files


def keeps_quality(cand: dict, ref: dict, margin: float, alpha: float) -> dict:
    """Whether a quant keeps the reference's quality: the gate's rule (:func:`decide`: every
    metric both have no worse than the margin) and grounded facts not significantly worse
    (McNemar p < alpha with more questions only the reference gets right).

    -> ``{"keeps", "why", "mcnemar_p", "only_quant", "only_reference", "deltas"}``."""
    d = decide(cand, ref, margin)
    paired = d.get("facts_paired") or {}
    p = paired.get("p")
    worse = p is not None and p < alpha and paired["only_b"] > paired["only_a"]
    out = {
        "mcnemar_p": p,
        "only_quant": paired.get("only_a"),
        "only_reference": paired.get("only_b"),
        "deltas": {m: round(r["delta"], 4) for m, r in d["metrics"].items()},
    }
    lost = [
        f"{m} {r['candidate']:.3f} vs {r['published']:.3f} (below by more than {margin})"
        for m, r in d["metrics"].items()
        if not r["ok"]
    ]
    if worse:
        lost.append(
            f"grounded facts significantly worse (McNemar p={p:.3g} < {alpha}, "
            f"{paired['only_b']} questions only the reference gets vs {paired['only_a']})"
        )
    if not d["metrics"]:
        lost.append("no quality figures to compare")
    out["keeps"] = not lost
    out["why"] = "; ".join(lost) if lost else "keeps quality"
    return out


def choose(
    figures: dict[str, dict],
    reference: str,
    margin: float,
    alpha: float,
    min_speedup: float = 0.0,
) -> dict:
    """Pick the model to serve: quality first, then prefill speed.

    ``figures``: name -> ``{"prefill_tok_s", "decode_tok_s", "size_bytes"}`` and the gate's
    figures (``facts_accuracy``, ``facts_correct``, ``qa_f1``, ...), the reference among them.
    Of the reference and the quants that keep its quality (:func:`keeps_quality`), the fastest
    prefill wins (decode speed breaks a tie); a quant must prefill at least ``min_speedup``
    (a share) faster than the reference to replace it. -> ``{"chosen", "verdict", "table"}``,
    the table a row per model (the reference first) with its figures, ``keeps_quality``,
    ``chosen`` and ``why``."""
    if reference not in figures:
        raise ValueError(f"no figures for the reference {reference!r}")
    ref = figures[reference]
    checks = {n: keeps_quality(f, ref, margin, alpha) for n, f in figures.items() if n != reference}
    keepers = [reference, *(n for n, c in checks.items() if c["keeps"])]

    def speed(n: str) -> tuple[float, float]:
        return figures[n].get("prefill_tok_s") or 0.0, figures[n].get("decode_tok_s") or 0.0

    rp = speed(reference)[0]
    faster = [n for n in keepers[1:] if speed(n)[0] >= rp * (1 + min_speedup)]
    chosen = max([reference, *faster], key=speed)  # max keeps the first of equals: the reference
    table = []
    for n in [reference, *checks]:
        f = figures[n]
        row = {
            "model": n,
            "size_mb": round(f["size_bytes"] / 1e6, 1) if f.get("size_bytes") else None,
            "prefill_tok_s": f.get("prefill_tok_s"),
            "decode_tok_s": f.get("decode_tok_s"),
            **{m: f[m] for m in METRICS if f.get(m) is not None},
        }
        if n == reference:
            row |= {"keeps_quality": True, "why": "the reference (the published model)"}
        else:
            c = checks[n]
            row |= {
                "keeps_quality": c["keeps"],
                "mcnemar_p": c["mcnemar_p"],
                "only_quant": c["only_quant"],
                "only_reference": c["only_reference"],
                "why": c["why"],
            }
        row["chosen"] = n == chosen
        if n in keepers and n != chosen:
            row["why"] += f"; prefill {speed(n)[0]:.0f} tok/s" + (
                f", slower than {chosen} ({speed(chosen)[0]:.0f})"
                if n == reference or n in faster
                else f", not {min_speedup:.0%} faster than the reference ({rp:.0f})"
            )
        table.append(row)
    if chosen != reference:
        verdict = (
            f"{chosen} is chosen: it keeps the reference's quality and prefills fastest "
            f"({speed(chosen)[0]:.0f} tok/s vs {rp:.0f} for {reference})"
        )
    elif len(keepers) == 1:
        lost = "; ".join(f"{n}: {c['why']}" for n, c in checks.items())
        verdict = f"the reference {reference} is kept: no quant keeps its quality ({lost})"
    else:
        verdict = (
            f"the reference {reference} is kept: no quant that keeps its quality prefills "
            f"{min_speedup:.0%} faster than its {rp:.0f} tok/s"
        )
    return {"chosen": chosen, "verdict": verdict, "table": table}


def table_markdown(table: list[dict]) -> str:
    """The choice table as Markdown (docs/benchmarks.md)."""

    def fmt(v, spec: str = ".3f") -> str:
        return "" if v is None else format(v, spec)

    lines = [
        "| model | size (MB) | prefill tok/s | decode tok/s | grounded facts | QA F1 | "
        "McNemar p vs reference (only quant / only ref.) | keeps quality | chosen | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        p = r.get("mcnemar_p")
        paired = "" if p is None else f"{p:.3g} ({r['only_quant']} / {r['only_reference']})"
        lines.append(
            f"| {r['model']} | {fmt(r['size_mb'], '.1f')} | {fmt(r['prefill_tok_s'], '.0f')} | "
            f"{fmt(r['decode_tok_s'], '.0f')} | {fmt(r.get('facts_accuracy'))} | "
            f"{fmt(r.get('qa_f1'))} | {paired} | {'yes' if r['keeps_quality'] else 'no'} | "
            f"{'**yes**' if r['chosen'] else ''} | {r['why']} |"
        )
    return "\n".join(lines)


@register(
    "quant_select",
    QuantSelectStep,
    needs=(Need("model"),),
    produces={"gguf": "model.gguf", "gate": PROV},
)
def run_quant_select(ctx: StepContext) -> dict:
    """Export several quants, measure each one's speed and quality against the published model,
    and keep the fastest that keeps quality (else the published model) as the step's GGUF."""
    from docqa.provenance import sha256_file
    from docqa.settings import load_settings
    from eval.speed import measure_speed
    from models.store import ModelStore
    from training.gate import evaluate, published_model

    cfg: QuantSelectStep = ctx.config
    src = ctx.input("model")
    s = load_settings()
    reference = published_model(cfg.quality)
    ref_path = ModelStore(s.model.store_dir).resolve(reference).path
    threads = cfg.threads or s.model.n_threads
    with step_dir(ctx.out, ctx.name) as tmp:
        files = export_quants(src, tmp, cfg.quants)
        paths = {reference: ref_path, **files}
        speed = measure_speed(
            paths,
            threads=threads,
            prompt_tokens=cfg.prompt_tokens,
            tokens=cfg.decode_tokens,
            rounds=cfg.rounds,
        )
        figures = {}
        for name, path in paths.items():
            log.info("quant_select: evaluating %s", name)
            quality = evaluate(  # the quants served with the candidate's settings, if any
                reference if name == reference else str(path),
                cfg.quality,
                None if name == reference else (cfg.quality.candidate_settings or None),
            )
            figures[name] = {"size_bytes": Path(path).stat().st_size, **speed[name], **quality}
        result = choose(figures, reference, cfg.quality.margin, cfg.quality.alpha, cfg.min_speedup)
        chosen = result["chosen"]
        final = tmp / "model.gguf"
        if chosen == reference:
            shutil.copyfile(ref_path, final)
        else:
            os.link(files[chosen], final)
        (tmp / "comparison.json").write_text(json.dumps(result | {"figures": figures}, indent=2))
        (tmp / "table.md").write_text(table_markdown(result["table"]) + "\n")
        log.info("quant_select: %s", result["verdict"])
        return finish(
            tmp,
            "quant_select",
            cfg,
            inputs={"model": str(src), "reference": str(ref_path)},
            metrics=result
            | {
                "threads": threads,
                "prompt_tokens": cfg.prompt_tokens,
                "decode_tokens": cfg.decode_tokens,
                "rounds": cfg.rounds,
                "min_speedup": cfg.min_speedup,
            },
            passed=True,  # the chosen model keeps the reference's quality (or is the reference)
            quant=chosen if chosen != reference else None,
            sha256=sha256_file(final),
        )
