"""Evaluation harness on tiny fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from docqa.data import QAPair, is_heldout, load_qa, split_qa
from docqa.settings import load_settings
from eval.mcq import MCQ, parse_letter, read_mcq, run_letter, run_loglik, write_mcq
from eval.metrics import has_facts, rouge_l, summarize, token_f1, welch
from eval.qa import fact_set, load_facts, load_offtopic, run_facts
from eval.report import mcq_table, plot_accuracy
from eval.targets import Reply
from models.store import ModelStore
from retrieval.questions import retrieval_devset

from .conftest import SHARED


class ScriptedTarget:
    """A target replying from a script: exercises counting without a model."""

    name = "scripted"
    is_docqa = True

    def __init__(self, replies):
        self.replies = list(replies)

    def chat(self, messages, **kw):
        r = self.replies.pop(0)
        if isinstance(r, Exception):
            return Reply(error=str(r))
        return Reply(r) if isinstance(r, str) else r


ITEMS = [
    MCQ("q1?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "B"),
    MCQ("q2?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "D"),
    MCQ("q3?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "A"),
]


def test_parse_letter_is_strict():
    assert parse_letter("B") == "B" and parse_letter(" C\n") == "C"
    for bad in ["b", "B.", "B) foo", "The answer is B", "", "E", "AB", None]:
        assert parse_letter(bad) is None


def test_letter_mode_counts_invalid_and_errors_and_goes_on():
    # questions outer, rounds inner: (q1 r1, q1 r2, q2 r1, q2 r2, q3 r1, q3 r2)
    t = ScriptedTarget(["B", "B", "The answer is D", "D", RuntimeError("boom"), "A"])
    res = run_letter(t, ITEMS, rounds=2, progress=False)
    assert res.accuracy == [pytest.approx(1 / 3), 1.0]
    assert res.invalid == [1, 0] and res.errors == [1, 0]
    d = res.to_dict()
    assert {"n", "rounds", "accuracy", "invalid", "per_question"} <= set(d)
    assert d["per_question"][1]["answers"] == [None, "D"]
    assert d["per_question"][2]["errors"] == ["boom"]
    json.dumps(d)


def test_mcq_csv_roundtrip(tmp_path):
    p = tmp_path / "m.csv"
    write_mcq(p, ITEMS)
    head = p.read_text().splitlines()[:2]
    assert head[0] == "question,a,b,c,d,correct" and head[1] == "q1?,A. a,B. b,C. c,D. d,B"
    assert read_mcq(p) == ITEMS
    (tmp_path / "bad.csv").write_text("question,a,b,c,d,correct\nq,A. x,B. y,C. z,D. w,E\n")
    with pytest.raises(ValueError):
        read_mcq(tmp_path / "bad.csv")


def test_loglik_picks_planted_answer():
    gguf = ModelStore("models/store").resolve("smollm2-135m-instruct").path
    items = [
        MCQ(
            "What is the capital of France?",
            {
                "A": "Zebra stripes of purple glue.",
                "B": "The capital of France is Paris.",
                "C": "Xylophone quantum banana.",
                "D": "Seventeen ladders of soup.",
            },
            "B",
        ),
        MCQ(
            "What color is the sky on a clear day?",
            {
                "A": "Refrigerator mountain sings.",
                "B": "Gravel pancake velocity.",
                "C": "Mitten tuba asphalt.",
                "D": "The sky is blue.",
            },
            "D",
        ),
    ]
    ms = load_settings(model={"n_ctx": 512, "n_threads": 1}).model
    res = run_loglik(gguf, items, ms, progress=False)
    assert res.accuracy == [1.0]


def test_statistics_against_known_values():
    s = summarize([0.5, 0.6, 0.7])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)
    assert (s.min, s.max, s.n) == (0.5, 0.7, 3)
    a, b = [0.50, 0.55, 0.52, 0.58], [0.60, 0.66, 0.61, 0.70]
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    assert w["t"] == pytest.approx(-3.6104, abs=1e-3)  # by hand: -0.105 / 0.029083


def test_text_metrics():
    assert token_f1("Nitro listens on port 3928", "port 3928") == pytest.approx(2 * 0.4 / 1.4)
    assert token_f1("", "x") == 0.0 and token_f1("The cat.", "cat") == 1.0
    assert rouge_l("w x y z", "w y z") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert has_facts("Use the NGL field, e.g. ngl: 100", ["ngl"])
    assert not has_facts("use ctx", ["ctx_len"])


def test_report_table_and_plot(tmp_path):
    res = {"x": {"accuracy": [0.5, 0.7], "invalid": [1, 0], "errors": [0, 0], "rounds": 2}}
    table = mcq_table(res)
    assert "| x | 60.0% |" in table and "0.5 |" in table
    plot_accuracy(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_facts_and_offtopic_sets_are_well_formed():
    facts = load_facts()
    assert len(facts) >= 30 and all(f.facts and f.doc for f in facts)
    assert len(fact_set("2")) >= 60 and len(fact_set("all")) == len(facts) + len(fact_set("2"))
    assert fact_set("1") == facts
    with pytest.raises(ValueError, match="unknown fact set"):
        fact_set("3")
    assert len(load_offtopic()) >= 30
    # set 2: no fact given away by its question, none asked twice (in either set)
    seen = {x.lower() for f in facts for x in f.facts}
    for f in fact_set("2"):
        assert f.facts and f.doc, f
        assert not any(x.lower() in f.question.lower() for x in f.facts), f.question
        assert not seen & {x.lower() for x in f.facts}, f.question
        seen |= {x.lower() for x in f.facts}
    root = SHARED / "nitro-docs"
    if root.is_dir():  # every key fact really is in its document
        for f in fact_set("all"):
            text = (root / f.doc).read_text().lower()
            assert all(x.lower() in text for x in f.facts), f.question


def test_run_facts_scores_and_continues():
    items = load_facts()[:3]
    t = ScriptedTarget(
        [Reply("port 3928", [{"path": items[0].doc}]), RuntimeError("down"), Reply("no idea")]
    )
    res = run_facts(t, items, progress=False)
    assert res["accuracy"] == pytest.approx(1 / 3) and res["errors"] == 1
    assert res["doc_in_sources"] == pytest.approx(1 / 3)


def test_retrieval_devset_on_toy_chunks():
    from retrieval.chunking import Chunk

    chunks = [
        Chunk("c1", "a.md", "", "Zephyrd listens on port 7431 for HTTP.", 9),
        Chunk("c2", "b.md", "", "Set max_parallel_jobs to limit running jobs.", 9),
    ]
    items = retrieval_devset(
        [
            QAPair("Which port?", "It listens on port 7431."),
            QAPair("How to limit jobs?", "Use max_parallel_jobs."),
            QAPair("Unrelated?", "Bananas are yellow fruit."),
        ],
        chunks,
    )
    assert [(i.question, i.gold_ids) for i in items] == [
        ("Which port?", ["c1"]),
        ("How to limit jobs?", ["c2"]),
    ]


def test_a_question_with_several_answers_has_all_their_chunks(tmp_path):
    """GPT-4 asked "What is Nitro?" of 30 chunks: each answer's chunk answers the question.
    load_qa keeps them with duplicates=True, the dev set unions their gold, and the attacher
    puts the question on each chunk."""
    from docqa.data import load_qa
    from retrieval.chunking import Chunk
    from retrieval.questions import attach_questions

    csv = tmp_path / "qa.csv"
    csv.write_text(
        "question,answer\n"
        "What is Zephyrd?,Zephyrd listens on port 7431 for HTTP.\n"
        "What is Zephyrd?,It runs jobs limited by max_parallel_jobs.\n"
        "What is Zephyrd?,It runs jobs limited by max_parallel_jobs.\n"
        "Which port?,Port 7431.\n"
    )
    assert len(load_qa(csv)) == 2  # first answer per question (training's view)
    pairs = load_qa(csv, duplicates=True)
    assert len(pairs) == 3  # exact repeats still collapse
    chunks = [
        Chunk("c1", "a.md", "", "Zephyrd listens on port 7431 for HTTP.", 9),
        Chunk("c2", "b.md", "", "Set max_parallel_jobs to limit running jobs.", 9),
    ]
    items = {i.question: i for i in retrieval_devset(pairs, chunks)}
    assert len(items) == 2
    assert items["What is Zephyrd?"].gold_ids == ["c1", "c2"]
    assert items["What is Zephyrd?"].gold_paths == ["a.md", "b.md"]
    assert items["Which port?"].gold_ids == ["c1"]

    class OneHot:
        dim = 2

        def embed(self, texts, progress=False):
            return np.eye(2, dtype=np.float32)[[i % 2 for i in range(len(texts))]]

    qs = attach_questions(pairs, chunks, OneHot())
    assert qs.by_chunk() == {"c1": ["What is Zephyrd?", "Which port?"], "c2": ["What is Zephyrd?"]}


def test_non_answers_get_no_gold_and_are_not_attached():
    """A reference answer saying the docs don't cover it has no chunk holding it."""
    from retrieval.chunking import Chunk
    from retrieval.questions import AnswerLabeler, is_non_answer

    hedged = [
        "The context does not provide specific information about the creator of Zephyrd.",
        "The exact role is not explicitly mentioned in the provided context.",
        "Without further context, it's hard to say what 'llama' means here.",
    ]
    plain = [
        "If the port is not specified, Zephyrd listens on port 7431.",
        "It does not provide a GUI; use the HTTP API on port 7431.",
        "No, there is no information yet under Audio: the page says coming soon.",
    ]
    assert all(map(is_non_answer, hedged)) and not any(map(is_non_answer, plain))
    chunks = [Chunk("c1", "a.md", "", "Zephyrd listens on port 7431 for HTTP.", 9)]
    lab = AnswerLabeler(chunks)
    assert lab.label("Which port does Zephyrd use?", plain[0]).chunk_idx == [0]
    hedged_port = "The context does not provide specific information about the Zephyrd port 7431."
    assert lab.label("Which port does Zephyrd use?", hedged_port) is None
    items = retrieval_devset([QAPair("Which port does Zephyrd use?", hedged_port)], chunks)
    assert items == []


def test_audit_drops_unanswerable_and_extends_gold():
    from eval.devsets import audited_devset, question_key
    from retrieval.chunking import Chunk
    from retrieval.questions import RetrievalItem

    chunks = [
        Chunk("c1", "a.md", "Port", "Zephyrd listens on port 7431.", 9),
        Chunk("c2", "b.md", "Config > Port", "port: 7431 in zephyrd.yaml", 9),
        Chunk("c3", "b.md", "Config > Port", "restart after changing the port", 9),
    ]
    items = [
        RetrievalItem("Which port?", ["c1"], ["a.md"], 0.8),
        RetrievalItem("What does the given text say?", ["c1"], ["a.md"], 0.4),
        RetrievalItem("Untouched?", ["c2"], ["b.md"], 0.6),
    ]
    audit = {
        "misses": {
            question_key("Which port?"): {
                "verdict": "relevant",
                "sections": [["b.md", "Config > Port"]],
            },
            question_key("What does the given text say?"): {"verdict": "unanswerable"},
        }
    }
    out = audited_devset(items, chunks, audit)
    assert [i.question for i in out] == ["Which port?", "Untouched?"]
    assert out[0].gold_ids == ["c1", "c2", "c3"] and out[0].gold_paths == ["a.md", "b.md"]
    assert out[1] == items[2]


@pytest.mark.skipif(not (SHARED / "nitro-qa").is_dir(), reason="../shared data not present")
def test_audit_file_matches_the_nitro_dev_set():
    """Every audited question is a held-out dev question and every judged section exists in
    the Nitro docs as chunked by default, so the audit cannot silently drift from the data."""
    from eval.devsets import load_audit, question_key
    from retrieval.builder import chunk_documents, default_tokenizer
    from retrieval.loaders import load_tree

    audit = load_audit()
    held = {question_key(p.question) for p in split_qa(load_qa())[1]}
    keys = list(audit["misses"]) + audit["hits_sampled"]["keys"]
    assert len(keys) == len(set(keys)) and set(keys) <= held
    verdicts = {v["verdict"] for v in audit["misses"].values()}
    assert verdicts <= {"relevant", "unanswerable", "miss"}
    chunks = chunk_documents(load_tree(SHARED / "nitro-docs"), default_tokenizer(), 300, 30)
    sections = {(c.path, c.heading) for c in chunks}
    for v in audit["misses"].values():
        assert (v["verdict"] == "relevant") == bool(v.get("sections"))
        for path, heading in v.get("sections", []):
            assert (path, heading) in sections


@pytest.mark.skipif(not (SHARED / "nitro-qa").is_dir(), reason="../shared data not present")
def test_heldout_split_is_deterministic_and_disjoint():
    pairs = load_qa()
    train, held = split_qa(pairs)
    assert len(held) == len(split_qa(load_qa())[1])
    assert not {p.question for p in train} & {p.question for p in held}
    assert 0.07 < len(held) / len(pairs) < 0.13
    assert all(is_heldout(p.question) for p in held)
    assert np.mean([is_heldout(p.question) for p in train]) == 0


def test_an_answer_key_is_read_whole(tmp_path):
    from eval.mcq import read_mcq

    rows = ["question,a,b,c,d,correct"]
    for key in ("B", "(c)", "Answer: D", "a."):
        rows.append(f"Which?,A. one,B. two,C. three,D. four,{key}")
    f = tmp_path / "mcq.csv"
    f.write_text("\n".join(rows) + "\n")
    assert [it.correct for it in read_mcq(f)] == ["B", "C", "D", "A"]
    for bad in ("Answer: E", "D is right"):  # before: read as A and D
        f.write_text(f"question,a,b,c,d,correct\nWhich?,A. x,B. y,C. z,D. w,{bad}\n")
        with pytest.raises(ValueError, match="correct"):
            read_mcq(f)
