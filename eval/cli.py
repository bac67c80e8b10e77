"""`docqa eval retrieval|qa|facts|mcq|build-mcq|compare`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from docqa.logs import setup_logging
from eval.qa import DEFAULT_FACT_SET
from eval.report import mcq_table, plot_accuracy, welch_lines, write_json

app = typer.Typer(help="Evaluate retrieval, answers and multiple choice.", no_args_is_help=True)
console = Console()
log = logging.getLogger(__name__)

TargetOpt = typer.Option(..., "--target", "-t", help="docqa/OpenAI URL, or a GGUF path/name.")
ModelOpt = typer.Option(None, "--model", "-m", help="Model id at the URL target.")
RagOpt = typer.Option(True, "--rag/--no-rag", help="Answer with retrieval (docqa targets).")
IndexOpt = typer.Option(None, "--index", help="Index for local GGUF targets with --rag.")
JsonOpt = typer.Option(None, "--json", help="Write a machine-readable summary here.")


def _heldout(limit: int | None):
    from docqa.data import load_qa, split_qa

    _, held = split_qa(load_qa())
    return held[:limit] if limit else held


def _default_index(index: Optional[Path]) -> str:
    if index is not None:
        return str(index)
    from retrieval.corpus import nitro_index

    return str(nitro_index())


@app.command()
def retrieval(
    index: Optional[Path] = IndexOpt,
    target: Optional[str] = typer.Option(None),
    limit: Optional[int] = None,
    qa: Optional[Path] = typer.Option(
        None, exists=True, help="Dev Q&A pairs (CSV question,answer); default: Nitro held-out."
    ),
    hits: Optional[Path] = typer.Option(None, help="Write each question's ranked chunk ids."),
    json_out: Optional[Path] = JsonOpt,
):
    """recall@1/3/5 and MRR on the held-out dev set (in-process, or /v1/retrieve of --target)."""
    from docqa.data import load_qa
    from eval.retrieval_eval import evaluate_retrieval

    setup_logging("WARNING")
    pairs = load_qa(qa, duplicates=True)[:limit] if qa else _heldout(limit)
    try:
        res = evaluate_retrieval(_default_index(index), target, pairs, hits_out=hits)
    except ValueError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from exc
    console.print(res["table"])
    write_json(json_out, res)


@app.command()
def facts(
    target: str = TargetOpt,
    model: Optional[str] = ModelOpt,
    rag: bool = RagOpt,
    index: Optional[Path] = IndexOpt,
    json_out: Optional[Path] = JsonOpt,
    fact_set_name: str = typer.Option(
        DEFAULT_FACT_SET, "--set", help="Fact questions: 1 (34), 2 (66, written later), all (both)."
    ),
):
    """Grounded facts: share of answers containing every key fact; right doc among sources."""
    from eval.qa import fact_set, run_facts
    from eval.targets import open_target

    setup_logging("WARNING")
    with open_target(
        target, model=model, rag=rag, index=_default_index(index) if rag else None
    ) as t:
        res = run_facts(t, fact_set(fact_set_name))
    console.print(
        "| system | grounded-fact accuracy | right doc in sources | answers echoing scaffolding "
        "| answers naming what their sources lack |\n|---|---|---|---|---|\n"
        f"| {t.name} | {res['accuracy']:.3f} | {res['doc_in_sources']:.3f} "
        f"| {res['unclean']} of {res['n']} | {res['unsupported']} of {res['n']} |"
    )
    write_json(json_out, res)


@app.command()
def qa(
    target: str = TargetOpt,
    model: Optional[str] = ModelOpt,
    rag: bool = RagOpt,
    index: Optional[Path] = IndexOpt,
    limit: Optional[int] = typer.Option(60),
    json_out: Optional[Path] = JsonOpt,
):
    """Held-out Q&A: F1, ROUGE-L, citation precision, abstain rates."""
    from eval.qa import load_offtopic, run_abstain, run_qa
    from eval.retrieval_eval import gold_map
    from eval.targets import open_target

    setup_logging("WARNING")
    idx = _default_index(index)
    pairs = _heldout(limit)
    with open_target(target, model=model, rag=rag, index=idx if rag else None) as t:
        res = run_qa(t, pairs, gold_map(idx, pairs))
        res["offtopic"] = run_abstain(t, load_offtopic())
    cp = res["citation_precision"]
    console.print(
        "| system | F1 | ROUGE-L | citation precision | abstain (off-topic) "
        "| abstain (in-corpus) | answers echoing scaffolding | answers naming what their "
        "sources lack |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {t.name} | {res['f1']:.3f} | {res['rouge_l']:.3f} | "
        f"{'n/a' if cp is None else f'{cp:.3f}'} | {res['offtopic']['abstain_rate']:.3f} | "
        f"{res['abstain_in_corpus']:.3f} | {res['unclean']} of {res['n']} | "
        f"{res['unsupported']} of {res['n']} |"
    )
    write_json(json_out, res)


@app.command("build-mcq")
def build_mcq(
    out: Path = typer.Option(Path("var/dev_mcq.csv"), "--out"),
    n: int = typer.Option(100, help="Questions."),
    seed: int = 0,
):
    """Build the dev MCQ set from held-out pairs (same CSV format as the published set)."""
    from docqa.settings import load_settings
    from eval.mcq import build_dev_mcq, write_mcq
    from retrieval.factory import load_embedder

    setup_logging("WARNING")
    embedder = load_embedder(load_settings().embedder)  # the settings' (was: its own defaults)
    items = build_dev_mcq(_heldout(None), embedder, n=n, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mcq(out, items)
    console.print(f"wrote {len(items)} questions to {out}")


def _mcq_items(file: Optional[Path]):
    from eval.mcq import read_mcq
    from eval.resources import dev_mcq

    return read_mcq(file or dev_mcq())


def run_mcq_target(
    spec: str,
    items,
    *,
    model=None,
    rag=True,
    index=None,
    mode="letter",
    rounds=1,
    temperature=0.1,
    name=None,
) -> dict:
    from eval.mcq import run_letter, run_loglik
    from eval.targets import open_target

    if mode == "loglik":
        from docqa.settings import load_settings
        from models.store import ModelStore

        s = load_settings()
        retr = None
        if rag:
            from retrieval.factory import build_retriever

            retr = build_retriever(index, s)
        path = (
            Path(spec)
            if spec.endswith(".gguf")
            else ModelStore(s.model.store_dir).resolve(spec).path
        )
        return run_loglik(path, items, s.model, retr).to_dict() | {"name": name or spec}
    with open_target(spec, model=model, rag=rag, index=index, name=name) as t:
        return run_letter(t, items, rounds, temperature).to_dict() | {"name": t.name}


@app.command()
def mcq(
    target: str = TargetOpt,
    model: Optional[str] = ModelOpt,
    rag: bool = RagOpt,
    index: Optional[Path] = IndexOpt,
    file: Optional[Path] = typer.Option(None, "--file"),
    mode: str = typer.Option("letter", help="letter | loglik"),
    rounds: int = typer.Option(1, min=1),
    temperature: float = typer.Option(0.1),
    limit: Optional[int] = None,
    json_out: Optional[Path] = JsonOpt,
    plot: Optional[Path] = typer.Option(None, help="PNG of accuracy over rounds."),
):
    """Multiple-choice accuracy (published protocol) over rounds."""
    setup_logging("WARNING")
    items = _mcq_items(file)[:limit] if limit else _mcq_items(file)
    res = run_mcq_target(
        target,
        items,
        model=model,
        rag=rag,
        index=_default_index(index) if rag else None,
        mode=mode,
        rounds=rounds,
        temperature=temperature,
    )
    table = {res["name"]: res}
    console.print(mcq_table(table))
    if plot:
        plot_accuracy(table, plot)
    write_json(json_out, res)


@app.command()
def compare(
    targets: list[str] = typer.Option(
        ..., "--target", "-t", help="NAME=SPEC[@model][+rag]; repeatable."
    ),
    file: Optional[Path] = typer.Option(None, "--file"),
    index: Optional[Path] = IndexOpt,
    rounds: int = typer.Option(5, min=1),
    temperature: float = 0.1,
    limit: Optional[int] = None,
    json_out: Optional[Path] = JsonOpt,
    plot: Optional[Path] = typer.Option(None),
):
    """Run several targets on the same questions; print the published-style table."""
    from eval.compare import parse_spec

    setup_logging("WARNING")
    items = _mcq_items(file)[:limit] if limit else _mcq_items(file)
    idx = _default_index(index)
    results = {}
    for spec in targets:
        name, tspec, model, rag = parse_spec(spec)
        results[name] = run_mcq_target(
            tspec,
            items,
            model=model,
            rag=rag,
            index=idx if rag else None,
            rounds=rounds,
            temperature=temperature,
            name=name,
        )
    console.print(mcq_table(results))
    console.print(welch_lines(results))
    if plot:
        plot_accuracy(results, plot)
    write_json(json_out, {"n": len(items), "rounds": rounds, "systems": results})
