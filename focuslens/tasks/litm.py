"""Real data: *Lost in the Middle* JSONL files, and N-document examples built from the oracle file.

The *Lost in the Middle* study (Liu et al., 2023; github nelson-liu/lost-in-the-middle) publishes
NaturalQuestions-Open questions as gzipped JSON lines: ``question``, ``answers``, ``ctxs`` (passages
with ``title``, ``text``, ``hasanswer``, ``isgold`` and, for retrieved ones, ``id``, ``score``,
``original_retrieval_index``). ``qa_data/nq-open-oracle.jsonl.gz`` holds each question with only its
gold passage; ``qa_data/{10,20,30}_total_documents/nq-open-*_gold_at_{k}.jsonl.gz`` add retrieved
distractors with the gold passage at position ``k``. Users download those files; focuslens ships
no copy of them (a 30-line slice of the oracle file is a test fixture).

* :func:`load_litm` reads any of them into :class:`~focuslens.tasks.records.TaskExample` records
  (errors name the file and line), :func:`save_litm` writes records back (LitM readers ignore the
  extra keys ``gold_index``, ``distractor_answers``, ``id``, ``task``).
* :func:`build_from_oracle` makes N-document examples from the oracle file alone: the distractors are
  *other questions'* gold passages that contain none of this question's answers, chosen at random or
  "hard" (the most similar to the question by TF-IDF, :class:`TfidfIndex`, plain numpy). Since a
  distractor is another question's gold passage, the answer it supports is known: it goes into
  ``distractor_answers``, which makes the distractor-copy rate measurable on real text.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from ..core.checks import parse_json
from ..core.errors import UsageError
from .metrics import normalize_answer
from .records import Document, TaskExample
from .synthetic import GoldPosition, _gold_position

__all__ = ["load_litm", "save_litm", "build_from_oracle", "TfidfIndex", "contains_answer", "question_split",
           "real_document_splits", "SPLITS"]

_WORD = re.compile(r"\w+")
_STOP = frozenset(
    "a an the of in on at to for by with from and or is are was were be been it its this that as "
    "which who whom what when where why how did do does not no".split()
)


def _open_text(path: Path):
    """Open a LitM file for reading as text: gzip by the ``.gz`` suffix or by its magic bytes."""
    gz = path.suffix == ".gz"
    if not gz:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, "rt", encoding="utf-8")


def load_litm(
    path: str | os.PathLike,
    *,
    limit: int | None = None,
    task: str | None = None,
) -> list[TaskExample]:
    """Read a LitM ``.jsonl.gz`` (or plain ``.jsonl``) file into records.

    Args:
        path: the file (gzip detected by extension or content).
        limit: read at most this many records.
        task: the records' ``task`` name (default: ``"litm"``, or what a line written by
            :func:`save_litm` says).

    Returns:
        One :class:`TaskExample` per non-empty line, ``id`` = ``"{file name}:{line}"`` unless the
        line has an ``id``; ``gold_index`` from ``isgold``; extra top-level keys (e.g.
        ``nq_annotated_gold``) kept in ``meta``.

    Raises:
        FileNotFoundError: no such file.
        focuslens.core.errors.UsageError: ``"{path}:{line}: ..."`` for a line that is not JSON or not a
            valid record; a folder; a ``.gz`` that is truncated or not gzip; bytes that are not UTF-8.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist. LitM files are downloaded from the lost-in-the-middle repository "
            "(qa_data/nq-open-oracle.jsonl.gz, qa_data/20_total_documents/...)."
        )
    if not p.is_file():
        raise UsageError(f"{p} is a folder; give a LitM .jsonl or .jsonl.gz file.")
    try:
        return _read_litm(p, limit=limit, task=task)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UsageError(f"{p}: cannot decompress ({type(e).__name__}: {e}): the file is truncated or not gzip; "
                         "download it again (or give an uncompressed .jsonl without the .gz suffix).") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); give a LitM .jsonl(.gz) file.") from None


def _read_litm(p: Path, *, limit: int | None, task: str | None) -> list[TaskExample]:
    name = p.name
    out: list[TaskExample] = []
    with _open_text(p) as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            obj = parse_json(line, f"{p}:{lineno}", what="expected one Lost-in-the-Middle record (question, answers, "
                             "ctxs) per line")
            if not isinstance(obj, dict):
                raise UsageError(f"{p}:{lineno}: malformed record: expected a JSON object with question, answers "
                                 f"and ctxs, got {type(obj).__name__}.")
            try:
                ex = TaskExample.from_dict(obj, id=f"{name}:{lineno}")
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise UsageError(f"{p}:{lineno}: malformed record: {why}") from None
            if task is not None:
                ex.task = task
            out.append(ex)
    return out


def save_litm(examples: Iterable[TaskExample], path: str | os.PathLike) -> Path:
    """Write records as LitM JSON lines (gzipped when ``path`` ends in ``.gz``, byte-reproducibly, atomically)."""
    from ..core.io import atomic_write

    p = Path(path)
    lines = [json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples]

    def write(tmp: str) -> None:
        if p.suffix == ".gz":  # mtime=0: the same records give byte-identical files
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as g:
                g.write("".join(lines).encode("utf-8"))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(lines)

    return atomic_write(p, write)


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    """True if a normalised answer occurs in the normalised text (as whole words)."""
    t = f" {normalize_answer(text)} "
    return any(f" {na} " in t for na in (normalize_answer(a) for a in answers) if na)


# --------------------------------------------------------------------------------------------------
# TF-IDF with numpy
# --------------------------------------------------------------------------------------------------


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class TfidfIndex:
    """Cosine similarity of TF-IDF vectors over a fixed set of passages (numpy, inverted index).

    Weights: sublinear term frequency ``1 + log(tf)`` times smoothed IDF ``log((1 + N) / (1 + df)) + 1``
    (scikit-learn's defaults), each vector L2-normalised; words are ``\\w+`` lower-cased, minus a
    few English stop words.

    Example:
        >>> idx = TfidfIndex(["the cat sat", "a dog barked", "cats and dogs"])
        >>> int(idx.scores("cat").argmax())
        0
    """

    def __init__(self, texts: Sequence[str]):
        self.n = len(texts)
        docs = [Counter(_terms(t)) for t in texts]
        df: Counter[str] = Counter()
        for c in docs:
            df.update(c.keys())
        self.vocab = {w: i for i, w in enumerate(sorted(df))}
        self.idf = np.array([math.log((1 + self.n) / (1 + df[w])) + 1.0 for w in sorted(df)])
        rows: list[list[int]] = [[] for _ in self.vocab]
        vals: list[list[float]] = [[] for _ in self.vocab]
        for d, c in enumerate(docs):
            if not c:
                continue
            ids = np.array([self.vocab[w] for w in c])
            w = (1.0 + np.log(np.array(list(c.values()), dtype=np.float64))) * self.idf[ids]
            w /= np.linalg.norm(w)
            for t, x in zip(ids.tolist(), w.tolist()):
                rows[t].append(d)
                vals[t].append(x)
        self._post_docs = [np.array(r, dtype=np.int64) for r in rows]
        self._post_vals = [np.array(v, dtype=np.float64) for v in vals]

    def scores(self, query: str) -> np.ndarray:
        """``[n_passages]`` cosine similarities of the query to every passage."""
        c = Counter(t for t in _terms(query) if t in self.vocab)
        out = np.zeros(self.n, dtype=np.float64)
        if not c:
            return out
        ids = np.array([self.vocab[w] for w in c])
        q = (1.0 + np.log(np.array(list(c.values()), dtype=np.float64))) * self.idf[ids]
        q /= np.linalg.norm(q)
        for t, x in zip(ids.tolist(), q.tolist()):
            np.add.at(out, self._post_docs[t], x * self._post_vals[t])
        return out


# --------------------------------------------------------------------------------------------------
# N-document examples from the oracle file
# --------------------------------------------------------------------------------------------------


def build_from_oracle(
    oracle: Sequence[TaskExample] | str | os.PathLike,
    *,
    n_docs: int = 20,
    distractors: Literal["random", "hard"] = "random",
    gold_position: GoldPosition = "random",
    n_examples: int | None = None,
    seed: int = 0,
) -> list[TaskExample]:
    """N-document QA examples from the oracle file: distractors are other questions' gold passages.

    Args:
        oracle: oracle records (one gold passage each) or the path of ``nq-open-oracle.jsonl.gz``.
        n_docs: documents per example (gold + ``n_docs - 1`` distractors).
        distractors: ``"random"`` (uniform among the eligible passages) or ``"hard"`` (the eligible
            passages most similar to the question by TF-IDF cosine; in decreasing similarity, as
            LitM orders retrieved passages). Eligible: another question's gold passage, with a
            different text, containing none of this question's answers.
        gold_position: 0-based gold position: an int, a list cycled over examples, or ``"random"``.
        n_examples: use only the first ``n_examples`` questions (default: all).
        seed: random choices are a pure function of ``(seed, question index)``.

    Returns:
        Records with ``task="litm_oracle_{distractors}"``; each distractor lists the answers of its
        own question that it contains in ``answers``, and ``distractor_answers`` collects them.
    """
    if isinstance(oracle, (str, os.PathLike)):
        oracle = load_litm(oracle)
    if distractors not in ("random", "hard"):
        raise ValueError(f"distractors must be 'random' or 'hard', got {distractors!r}.")
    pool = _oracle_pool(oracle)
    if n_docs < 1 or n_docs > len(pool):
        raise ValueError(f"n_docs must be in 1..{len(pool)} (the number of oracle passages), got {n_docs}.")
    index = TfidfIndex([f"{g.title} {g.text}" for _, _, g in pool]) if distractors == "hard" else None
    norm_texts = [f" {normalize_answer(f'{g.title} {g.text}')} " for _, _, g in pool]
    todo = pool if n_examples is None else pool[:n_examples]
    out: list[TaskExample] = []
    for i, (j, ex, gold) in enumerate(todo):
        rng = random.Random(f"litm_oracle:{seed}:{j}")
        chosen = _oracle_distractors(j, ex, gold, pool, norm_texts, n_docs - 1, distractors, index, rng)
        docs = []
        for k in chosen:
            _, other, g = pool[k]
            own = [a for a in other.answers if contains_answer(norm_texts[k], [a])]
            docs.append(Document(
                title=g.title, text=g.text, isgold=False, hasanswer=False, answers=own, kind=distractors,
                extra={"source_id": other.id},
            ))
        pos = _gold_position(gold_position, i, n_docs, rng)
        g_doc = Document(title=gold.title, text=gold.text, isgold=True, hasanswer=gold.hasanswer,
                         answers=list(ex.answers), kind="gold", extra=dict(gold.extra))
        docs.insert(pos, g_doc)
        out.append(TaskExample(
            question=ex.question, answers=list(ex.answers), ctxs=docs, gold_index=pos,
            distractor_answers=_distractor_answers(docs), task=f"litm_oracle_{distractors}",
            meta={"source_id": ex.id, "n_docs": n_docs, "seed": seed},
            id=f"{ex.id}|{distractors}{n_docs}-s{seed}",
        ))
    return out


def _oracle_pool(oracle: Sequence[TaskExample]) -> list[tuple[int, TaskExample, Document]]:
    """``(index, record, gold passage)`` of every oracle record (its first passage when none is marked gold)."""
    pool = []
    for j, ex in enumerate(oracle):
        g = ex.gold if ex.gold is not None else (ex.ctxs[0] if ex.ctxs else None)
        if g is None:
            raise ValueError(f"Oracle record {ex.id or j} has no passage.")
        pool.append((j, ex, g))
    return pool


def _oracle_distractors(j: int, ex: TaskExample, gold: Document, pool: list, norm_texts: list[str], need: int,
                        distractors: str, index: TfidfIndex | None, rng: random.Random) -> list[int]:
    """Pool indices of question ``j``'s ``need`` distractors: random, or the most similar by TF-IDF ("hard").
    Eligible: another question's passage, with a different text, containing none of this question's answers."""
    nas = [f" {na} " for na in (normalize_answer(a) for a in ex.answers) if na]
    eligible = [
        k for k, (_, _, g) in enumerate(pool)
        if k != j and g.text != gold.text and not any(na in norm_texts[k] for na in nas)
    ]
    if len(eligible) < need:
        raise ValueError(
            f"Question {ex.id or j}: only {len(eligible)} eligible distractor passages for {need}."
        )
    if distractors == "random":
        return rng.sample(eligible, need)
    s = index.scores(ex.question)[eligible]  # type: ignore[union-attr]
    order = np.lexsort((np.array(eligible), -s))  # by score desc, then pool index
    return [eligible[o] for o in order[:need]]


def _distractor_answers(docs: list[Document]) -> list[str]:
    """The distractors' answers, each once, in document order."""
    dist_answers: list[str] = []
    for d in docs:
        if not d.isgold:
            for a in d.answers:
                if a not in dist_answers:
                    dist_answers.append(a)
    return dist_answers


Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


def question_split(question: str, *, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """The split of one question: a pure function of its normalised text (and ``seed``).

    Why by question and by hash: a question must never be trained on and tested on (not even with
    other distractors or another gold position), and hashing its own text (not its line number or
    file name) puts it in the same split in the full oracle file, in any slice of it and in any later
    superset — so a test set stays a test set when more data is added.

    Args:
        question: the question text (normalised with :func:`~focuslens.tasks.metrics.normalize_answer`).
        fractions: ``(train, validation, test)``, non-negative, summing to 1.
        seed: another seed gives another (equally deterministic) partition.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers (train, validation, test) summing to 1; "
                         f"got {tuple(fractions)}.")
    import hashlib

    h = hashlib.sha256(f"focuslens-split:{seed}:{normalize_answer(question)}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < fr[0]:
        return "train"
    return "validation" if u < fr[0] + fr[1] else "test"


def real_document_splits(
    oracle: Sequence[TaskExample] | str | os.PathLike,
    *,
    n_docs: int = 10,
    distractors: Literal["random", "hard"] = "random",
    positions: Literal["cycle", "every"] = "cycle",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    splits: Sequence[Split] = SPLITS,
) -> dict[Split, list[TaskExample]]:
    """Train / validation / test sets of N-document examples with real passages, split by question.

    Each split is built by :func:`build_from_oracle` from **its own questions only**: a question's
    gold passage is a distractor only inside its own split, so no test passage (nor its answer) is
    ever seen in training, as gold or as distractor. Distractors never contain the question's
    answers (``build_from_oracle``'s eligibility rule).

    Args:
        oracle: oracle records or the path of ``nq-open-oracle.jsonl.gz`` (``../shared/data/litm/``).
        n_docs: documents per example (10 and 20 are the paper's / LitM's settings).
        distractors: ``"random"`` or ``"hard"`` (TF-IDF nearest to the question, within the split).
        positions: ``"cycle"``: question ``i`` of a split has the gold at position ``i mod n_docs``
            (each position gets ``≈ n / n_docs`` questions; one example per question);
            ``"every"``: each question once at **every** position (``n × n_docs`` examples, paired
            across positions: the lost-in-the-middle curve without question-mix noise).
        fractions: ``(train, validation, test)`` for :func:`question_split`.
        seed: the split seed and the distractor seed.
        splits: which splits to build (the others are skipped, not returned); a split's examples do
            not depend on which others are built.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}`` (the requested ones); ids end in ``@<split>`` (and
        ``/p<pos>`` with ``positions="every"``), ``meta["split"]`` names the split.
    """
    if isinstance(oracle, (str, os.PathLike)):
        oracle = load_litm(oracle)
    if positions not in ("cycle", "every"):
        raise ValueError(f"positions must be 'cycle' or 'every', got {positions!r}.")
    if not splits or any(sp not in SPLITS for sp in splits):
        raise ValueError(f"splits must name some of {SPLITS}, got {tuple(splits)!r}.")
    by: dict[Split, list[TaskExample]] = {s: [] for s in SPLITS}
    for ex in oracle:
        by[question_split(ex.question, fractions=fractions, seed=seed)].append(ex)
    out: dict[Split, list[TaskExample]] = {}
    for split, qs in by.items():
        if split not in splits:
            continue
        if not qs:
            out[split] = []
            continue
        if len(qs) < n_docs:
            raise ValueError(f"The {split} split has {len(qs)} questions, fewer than n_docs={n_docs}: its "
                             "distractors come from its own questions. Use more oracle records or fewer documents.")
        if positions == "cycle":
            rows = build_from_oracle(qs, n_docs=n_docs, distractors=distractors,
                                     gold_position=list(range(n_docs)), seed=seed)
        else:  # question-major: the n_docs positions of one question are adjacent
            # The distractors and their order do not depend on the gold position (build_from_oracle draws
            # them before placing the gold), so one build at position 0 moved to every position equals
            # n_docs builds (tested), at 1/n_docs of the cost.
            rows = [_move_gold(ex, p) for ex in build_from_oracle(qs, n_docs=n_docs, distractors=distractors,
                                                                  gold_position=0, seed=seed)
                    for p in range(n_docs)]
        for ex in rows:
            ex.id = f"{ex.id}@{split}" + ("" if positions == "cycle" else f"/p{ex.gold_index}")
            ex.meta = {**ex.meta, "split": split, "positions": positions}
        out[split] = rows
    return out


def _move_gold(ex: TaskExample, pos: int) -> TaskExample:
    """``ex`` (gold at position 0) with its gold passage moved to ``pos``; the distractors keep their order."""
    import copy

    docs = [copy.deepcopy(d) for d in ex.ctxs]
    gold = docs.pop(ex.gold_index)
    docs.insert(pos, gold)
    out = copy.deepcopy(ex)
    out.ctxs, out.gold_index = docs, pos
    return out
