"""Multiple choice: the published CSV format, a dev-set builder, letter and loglik modes."""

from __future__ import annotations

import csv
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from docqa.data import QAPair
from eval.metrics import token_f1

log = logging.getLogger(__name__)
LETTERS = "ABCD"
LETTER_GRAMMAR = "root ::= [ABCD]"
SYSTEM = (
    "You are taking a multiple-choice test about the Nitro documentation. Answer with "
    "exactly one letter: A, B, C or D. Do not write anything else."
)


@dataclass
class MCQ:
    question: str
    options: dict[str, str]  # letter -> text without the "A. " prefix
    correct: str

    def user_turn(self) -> str:
        opts = "\n".join(f"{k}. {v}" for k, v in self.options.items())
        return f"{self.question}\n\n{opts}\n\nAnswer:"


def _strip_prefix(text: str, letter: str) -> str:
    t = text.strip()
    for p in (f"{letter}. ", f"{letter}.", f"{letter}) "):
        if t.startswith(p):
            return t[len(p) :].strip()
    return t


def read_mcq(path: str | Path) -> list[MCQ]:
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            correct = _key_letter(row.get("correct", ""))
            if correct is None or not row.get("question"):
                raise ValueError(f"{path}:{i}: needs question,a,b,c,d,correct (A-D)")
            opts = {L: _strip_prefix(row.get(L.lower(), ""), L) for L in LETTERS}
            items.append(MCQ(row["question"], opts, correct))
    return items


def write_mcq(path: str | Path, items: list[MCQ]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "a", "b", "c", "d", "correct"])
        for it in items:
            w.writerow([it.question, *(f"{L}. {it.options[L]}" for L in LETTERS), it.correct])


def build_dev_mcq(pairs: list[QAPair], embedder, n: int = 100, seed: int = 0) -> list[MCQ]:
    """Correct option: the reference answer. Distractors: answers to other held-out questions
    on the nearest topics (question embeddings), skipping ones too close to the right answer."""
    rng = random.Random(seed)
    pool = list(pairs)
    q = embedder.embed([p.question for p in pool])
    sims = q @ q.T
    chosen = rng.sample(range(len(pool)), min(n, len(pool)))
    items = []
    for i in chosen:
        right = pool[i].answer
        distractors: list[str] = []
        for j in np.argsort(-sims[i]):
            if j == i or len(distractors) == 3:
                continue
            cand = pool[j].answer
            if token_f1(cand, right) > 0.5 or any(token_f1(cand, d) > 0.5 for d in distractors):
                continue
            distractors.append(cand)
        opts = [right, *distractors]
        rng.shuffle(opts)
        items.append(MCQ(pool[i].question, dict(zip(LETTERS, opts)), LETTERS[opts.index(right)]))
    return items


def parse_letter(reply: str | None) -> str | None:
    """Exactly one letter A-D (surrounding whitespace allowed), else None (= invalid): the
    letter protocol asks for the letter alone, as the published case did."""
    if reply is None:
        return None
    t = reply.strip()
    return t if len(t) == 1 and t in LETTERS else None


_KEY = re.compile(r"(?:answer\s*(?:is)?\s*:?\s*)?[(\[]?([A-Da-d])[)\].:]?", re.IGNORECASE)


def _key_letter(text: str) -> str | None:
    """A dev set's answer key: "B", "b", "(B)", "B.", "Answer: C"; None for anything else
    (before, its first character was taken: "Answer: C" read as A, "D is right" as D)."""
    m = _KEY.fullmatch(text.strip())
    return m.group(1).upper() if m else None


@dataclass
class MCQResult:
    n: int
    rounds: int
    accuracy: list[float]  # per round
    invalid: list[int]  # per round
    errors: list[int]  # per round (target failures)
    per_question: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        from eval.metrics import summarize

        return {
            "n": self.n,
            "rounds": self.rounds,
            "accuracy": self.accuracy,
            "accuracy_summary": summarize(self.accuracy).to_dict(),
            "invalid": self.invalid,
            "errors": self.errors,
            "per_question": self.per_question,
        }


def run_letter(
    target,
    items: list[MCQ],
    rounds: int = 1,
    temperature: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> MCQResult:
    answers: list[list[str | None]] = [[] for _ in items]
    errs: list[list[str | None]] = [[] for _ in items]
    bar = tqdm(total=rounds * len(items), desc=f"mcq {target.name}", disable=not progress)
    # Rounds inner: the same prompt back to back lets llama.cpp reuse its KV cache.
    for qi, it in enumerate(items):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": it.user_turn()}]
        for r in range(rounds):
            reply = target.chat(
                msgs,
                max_tokens=1,
                temperature=temperature,
                seed=seed + r * 100_003 + qi,
                grammar=LETTER_GRAMMAR,
            )
            answers[qi].append(None if reply.error else parse_letter(reply.text))
            errs[qi].append(reply.error)
            bar.update()
    bar.close()
    n = len(items)
    acc = [
        sum(answers[i][r] == it.correct for i, it in enumerate(items)) / n for r in range(rounds)
    ]
    invalid = [
        sum(answers[i][r] is None and errs[i][r] is None for i in range(n)) for r in range(rounds)
    ]
    errors = [sum(errs[i][r] is not None for i in range(n)) for r in range(rounds)]
    per_q = [
        {
            "question": it.question,
            "correct": it.correct,
            "answers": answers[i],
            "n_correct": sum(a == it.correct for a in answers[i]),
            "errors": [e for e in errs[i] if e],
        }
        for i, it in enumerate(items)
    ]
    return MCQResult(len(items), rounds, acc, invalid, errors, per_q)


def run_loglik(
    gguf: str | Path,
    items: list[MCQ],
    ms,
    retriever=None,
    top_k: int | None = None,
    progress: bool = True,
) -> MCQResult:
    """Pick the option whose text has the highest mean log-probability as the answer; the
    model loaded as the settings' ``model`` section (``ms``: context, threads, GPU layers)
    says."""
    import llama_cpp

    from server.engine import chat_formatter

    n_ctx = ms.n_ctx
    llm = llama_cpp.Llama(
        str(gguf),
        n_ctx=n_ctx,
        n_threads=ms.n_threads,
        n_gpu_layers=ms.n_gpu_layers,
        logits_all=True,
        verbose=False,
    )
    fmt = chat_formatter(llm)
    answers = []
    for it in tqdm(items, desc="mcq loglik", disable=not progress):
        user = it.question
        if retriever is not None:
            hits = retriever.search(it.question, top_k).hits
            ctx = "\n\n".join(f"[{i}] {h.chunk.text}" for i, h in enumerate(hits, 1))
            user = f"Documentation excerpts:\n{ctx}\n\nQuestion: {it.question}"
        prompt = fmt(messages=[{"role": "user", "content": user}]).prompt
        p_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)[: n_ctx - 64]
        n_p = len(p_ids)
        llm.reset()
        llm.eval(p_ids)  # the prompt once: each option is evaluated after its cached cells
        best, best_lp = None, -1e9
        for L, text in it.options.items():
            o_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            o_ids = o_ids[: n_ctx - 1 - n_p]
            llm.n_tokens = n_p  # drop the previous option (eval removes cells from here on)
            llm.eval(o_ids)
            scores = np.asarray(llm.scores[n_p - 1 : n_p - 1 + len(o_ids)], dtype=np.float64)
            rows = scores - scores.max(axis=1, keepdims=True)
            logp = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
            lp = float(np.mean(logp[np.arange(len(o_ids)), o_ids])) if o_ids else -1e9
            if lp > best_lp:
                best, best_lp = L, lp
        answers.append(best)
    llm.close()
    ok = sum(a == it.correct for a, it in zip(answers, items))
    per_q = [
        {
            "question": it.question,
            "correct": it.correct,
            "answers": [a],
            "n_correct": int(a == it.correct),
            "errors": [],
        }
        for a, it in zip(answers, items)
    ]
    return MCQResult(len(items), 1, [ok / len(items)], [0], [0], per_q)
