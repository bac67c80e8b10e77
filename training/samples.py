"""The model's own answers to training questions, judged against the reference (the
``samples`` step): rejection-sampling finetuning data and on-policy preference pairs.

Finetuning the 135M reader on GPT-4's reference sentences did not carry over to fact
questions it was not tuned on (docs/benchmarks.md, session 11). What the model says itself is
closer to what it can learn: given the evidence lines, its greedy answer states the gold
identifiers for about half the training questions and one of five answers for about two
thirds. So each training question is asked in the served prompt (the gold excerpt among
distractors, the evidence lines the server would pick; ``training.data.RagExamples``) through
llama.cpp, the greedy answer and ``candidates - 1`` sampled ones, and each answer is judged
(:func:`judge`): it must state every identifier of the reference that the evidence lines hold,
name nothing the lines and the question lack, echo no scaffolding and cite no excerpt but the
gold one; an answer cut at max_tokens is judged (and taught) up to its last whole sentence.
A right answer becomes an SFT example (``answers.jsonl``); a right and a wrong answer to the
same prompt become a DPO pair (``preferences.jsonl``).

Answers are cached per question (``candidates.jsonl`` in the cache directory) as they are made,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Verdict:
    right: bool
    why: str  # "" when right: the first failed check otherwise


def judge(answer: str, must: list[str], evidence: str, question: str, gold_tag: str, ended: bool):
    """Whether ``answer`` is a right grounded answer to a training question: it states each of
    ``must`` (the reference's identifiers the evidence lines hold), names nothing that the
    ``evidence`` lines and the question lack (``retrieval.answers.unsupported_names``), echoes
    no scaffolding, cites no excerpt but ``gold_tag`` and ``ended`` (no cut mid-sentence)."""
    from retrieval.answers import CITE, scaffolding, unsupported_names

    if not answer.strip():
        return Verdict(False, "empty")
    if not ended:
        return Verdict(False, "cut at max_tokens")
    missing = [m for m in must if m not in answer]
    if missing:
        return Verdict(False, f"does not state {missing[0]!r}")
    if scaffolding(answer):
        return Verdict(False, "echoes scaffolding")
    extra = unsupported_names(answer, evidence + "\n" + question)
    if extra:
        return Verdict(False, f"names {extra[0]!r}, not in the evidence")
    wrong = sorted(set(CITE.findall(answer)) - {gold_tag})
    if wrong:
        return Verdict(False, f"cites [{wrong[0]}]")
    return Verdict(True, "")


_SENTENCE_END = re.compile(r"[.!?](?:\s*\[\d{1,3}\])?(?=\s|$)")


def whole_sentences(text: str) -> str:
    """``text`` up to its last sentence end (a citation tag right after it kept): an answer cut
    at max_tokens, without its unfinished sentence ("" when it has none)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else ""


def names_something(must: list[str]) -> bool:
    """Whether the identifiers an answer must state include a real name or value (a digit,
    ``_``, ``/``, ``.``, ``-`` or an inner capital: ``ctx_len``, ``/v1/models``, ``3928``,
    ``AsyncOpenAI``), not only plain words a vague answer holds anyway ("server", "curl")."""
    return any(re.search(r"[\d_/.-]|.[A-Z]", m) for m in must)


def _key(question: str, fingerprint: str, reference: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{question}\n{reference}".encode()).hexdigest()[:20]


def sample_answers(pairs, cfg, cache: Path, settings=None, progress: bool = True) -> list[dict]:
    """Ask each usable pair's question in the served prompt, ``cfg.candidates`` times, until
    ``cfg.limit`` questions have been answered (questions whose reference names no real
    identifier the evidence lines hold are skipped: ``names_something``). -> one row per
    question: prompt, the reference identifiers it must state, evidence, and every answer with
    its verdict. Rows already in ``cache/candidates.jsonl`` for the same model and settings
    are reused."""
    from docqa.settings import load_settings
    from models.store import ModelStore
    from retrieval.answers import CITE
    from server.engine import chat_formatter, load_llama
    from training.data import RagExamples, identifiers

    s = settings or load_settings()
    r = s.retrieval
    max_tokens = cfg.max_tokens or r.answer_max_tokens
    temperature = cfg.temperature or r.answer_candidate_temperature
    path = ModelStore(s.model.store_dir).resolve(cfg.model).path
    fingerprint = json.dumps(
        [
            str(path),
            path.stat().st_size,
            path.stat().st_mtime_ns,  # a model exported again at the same path and size
            cfg.model_dump(exclude={"limit"}),
            r.stop,
            max_tokens,
            temperature,
            # every retrieval setting (the prompt's template, worked examples, evidence
            # units, the retriever and reranker) and the embedder: what builds the prompts
            r.model_dump(mode="json"),
            s.embedder.model_dump(mode="json"),
        ],
        sort_keys=True,
        default=str,
    )
    cache.mkdir(parents=True, exist_ok=True)
    store = cache / "candidates.jsonl"
    have = {}
    if store.exists():
        text = store.read_text()
        lines, good = text.splitlines(), []
        for line in lines:
            try:
                with_key = json.loads(line)
                have[with_key["key"]] = with_key
            except (ValueError, KeyError, TypeError):  # a run killed mid-append: asked again
                continue
            good.append(line)
        if len(good) != len(lines) or (text and not text.endswith("\n")):
            from docqa.provenance import atomic_write_text

            atomic_write_text(store, "".join(x + "\n" for x in good))
    builder = RagExamples(settings=s)
    rng = random.Random(cfg.seed)
    llm = None
    rows: list[dict] = []
    bar = tqdm(total=cfg.limit or len(pairs), desc="samples", disable=not progress)
    try:
        with store.open("a") as f:
            for p in pairs:
                if cfg.limit and len(rows) >= cfg.limit:
                    break
                ex = builder.example(p, cfg.k_chunks, 0.0, "grounded", rng)
                if ex is None or not ex["gold_in_context"]:
                    continue
                key = _key(p.question, fingerprint, p.answer)
                if key in have:
                    rows.append(have[key])
                    bar.update()
                    continue
                target = ex["completion"][0]["content"]
                gold_tag = CITE.findall(target)[-1]
                evidence = "\n".join(text for text, _ in ex["evidence"])
                must = identifiers(target, evidence)
                if not names_something(must):
                    continue
                if llm is None:
                    llm = load_llama(
                        path,
                        n_ctx=cfg.n_ctx,
                        n_batch=s.model.n_batch,
                        n_threads=cfg.threads or s.model.n_threads,
                        n_gpu_layers=s.model.n_gpu_layers,
                    )
                    fmt = chat_formatter(llm)
                    if fmt is None:
                        raise ValueError(f"{cfg.model}: the GGUF has no chat template")
                prompt = fmt(messages=ex["prompt"]).prompt  # as the server renders it
                answers = []
                for i in range(cfg.candidates):
                    out = llm.create_completion(
                        prompt,
                        temperature=0.0 if i == 0 else temperature,
                        seed=cfg.seed * 1000 + i,
                        max_tokens=max_tokens,
                        stop=list(r.stop),
                    )
                    choice = out["choices"][0]
                    text = (choice["text"] or "").strip()
                    ended = choice.get("finish_reason") == "stop"
                    if not ended:  # cut at max_tokens: its whole sentences may still be right
                        text, ended = whole_sentences(text), True
                    v = judge(text, must, evidence, p.question, gold_tag, ended)
                    answers.append({"text": text, "right": v.right, "why": v.why})
                row = {
                    "key": key,
                    "question": p.question,
                    "reference": p.answer,
                    "prompt": ex["prompt"],
                    "evidence": ex["evidence"],
                    "must": must,
                    "gold_tag": gold_tag,
                    "answers": answers,
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                rows.append(row)
                bar.update()
    finally:
        bar.close()
        if llm is not None:
            llm.close()
    return rows


def chosen_index(row: dict) -> int | None:
    """The answer an SFT example teaches: of the right ones, the best grounded in the evidence
    lines (``grounding_score``), the earliest (greedy first) on a tie; None when none is right."""
    from retrieval.answers import grounding_score

    ev = [text for text, _ in row["evidence"]]
    right = [i for i, a in enumerate(row["answers"]) if a["right"]]
    if not right:
        return None
    return max(right, key=lambda i: (grounding_score(row["answers"][i]["text"], ev), -i))


def greedy_examples(rows: list[dict]) -> list[dict]:
    """Every question's greedy answer, right or wrong, as an SFT example (with its evidence
    lines): what the model says now (``sft.own_answers: greedy``, the completions
    ``sft.objective: distill`` matches the stitched model to the plain one on)."""
    return [
        {
            "prompt": row["prompt"],
            "completion": [{"role": "assistant", "content": row["answers"][0]["text"]}],
            "evidence": row["evidence"],
        }
        for row in rows
        if row["answers"] and row["answers"][0]["text"]
    ]


def select(rows: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """-> (SFT examples, DPO pairs, counts). A question with a right answer gives an example;
    one with a right and a wrong answer also gives a pair, its rejected answer the greedy one
    when that is wrong, else the first wrong one."""
    examples, prefs = [], []
    for row in rows:
        ev = row["evidence"]  # (unit, tag) pairs: stitched training cuts the prompt by them
        i = chosen_index(row)
        if i is None:
            continue
        chosen = [{"role": "assistant", "content": row["answers"][i]["text"]}]
        examples.append({"prompt": row["prompt"], "completion": chosen, "evidence": ev})
        wrong = [j for j, a in enumerate(row["answers"]) if not a["right"] and a["text"]]
        if wrong:
            rejected = [{"role": "assistant", "content": row["answers"][wrong[0]]["text"]}]
            prefs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    n = len(rows)
    greedy = sum(r["answers"][0]["right"] for r in rows)
    counts = {
        "questions": n,
        "greedy_right": greedy,
        "any_right": len(examples),
        "rescued": len(examples) - greedy,  # right only when sampled: what greedy should learn
        "examples": len(examples),
        "preference_pairs": len(prefs),
    }
    return examples, prefs, counts
