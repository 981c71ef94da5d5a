"""Seeded, procedural distraction tasks: no downloads, made-up names, exact control of every factor.

Why synthetic tasks
-------------------
Real multi-document QA (NaturalQuestions with retrieved passages) mixes distraction with world
knowledge: a model may answer from memory and ignore the documents. The generators here use made-up
entity names and values, so the closed-book accuracy is about 0 and every correct answer *must* come
from the gold document. Every factor that distraction depends on is a knob: the number of documents,
the gold position, the kind of distractors, the document length.

Three tasks, one interface (:class:`~focuslens.tasks.records.TaskExample`, rendered by
:func:`~focuslens.tasks.records.render`):

* :func:`make_synthetic_qa` — entity–attribute multi-document QA in the *Lost in the Middle* template
  (``"The capital of Veloria is Quentor."``). Distractors of three kinds: ``"same_relation"`` (the
  same relation of other entities: the hardest, and the default), ``"same_entity"`` (other relations
  of the asked entity), ``"unrelated"`` (other relations of other entities). This is the default
  task of the demo: on SmolLM2-135M-Instruct accuracy falls from ~0.7 with 1 document to ~0.05
  with 20 (see ``docs/tasks.md``).
* :func:`make_kv_retrieval` — LitM key–value retrieval: a JSON object of random UUID pairs; the
  "documents" are the pairs and the relevant span is the gold pair.
* :func:`make_needle` — RULER-style multi-key needle in a haystack: filler chunks plus several
  ``"One of the special magic numbers for {key} is: {value}."`` needles; the relevant span is the
  queried needle.

Determinism: example ``i`` of seed ``s`` is drawn from its own random streams keyed on ``(s, i)``, so
the same seed gives the same examples, and — for :func:`make_synthetic_qa` — the same question,
answer and (a prefix of the same) distractors whatever ``n_docs`` is: sweeps over the number of
documents are paired.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from .records import NEEDLE_SENTENCE, Document, TaskExample

__all__ = [
    "RELATIONS",
    "DISTRACTOR_KINDS",
    "Relation",
    "make_synthetic_qa",
    "make_kv_retrieval",
    "make_needle",
    "made_up_name",
]

DistractorKind = Literal["same_relation", "same_entity", "unrelated"]
DISTRACTOR_KINDS: tuple[str, ...] = ("same_relation", "same_entity", "unrelated")
GoldPosition = int | Literal["random"] | Sequence[int] | None

# --------------------------------------------------------------------------------------------------
# Made-up names
# --------------------------------------------------------------------------------------------------

_ONSETS = [
    "b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "pr", "q", "r", "s", "st",
    "t", "tr", "v", "z", "th", "sh", "h", "j", "c", "cl", "fl", "pl",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "k", "nd", "rn"]
_SUFFIXES = {
    "entity": ["ia", "or", "and", "esh", "ova", "ar", "istan", "ania", "ora", "eth"],
    "city": ["ton", "grad", "burg", "mere", "vale", "port", "holm", "dor", "is", "ek", ""],
    "currency": ["el", "ar", "o", "ix", "un", "ek", "a"],
    "river": ["a", "ine", "os", "ar", "el", "e"],
    "language": ["ic", "ese", "ish", "an", "i"],
    "mountain": ["o", "an", "erg", "ak", "ir", ""],
    "person": ["", "", "a", "o", "en", "ick", "el"],
}


def made_up_name(rng: random.Random, kind: str = "entity", *, syllables: tuple[int, int] = (1, 2)) -> str:
    """A pronounceable made-up capitalised word (e.g. ``"Vraethor"``) from ``rng`` (4-12 letters)."""
    while True:
        n = rng.randint(*syllables)
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        w += rng.choice(_SUFFIXES.get(kind, [""]))
        if 4 <= len(w) <= 12:
            return w[:1].upper() + w[1:]


def _person(rng: random.Random) -> str:
    return f"{made_up_name(rng, 'person', syllables=(1, 2))} {made_up_name(rng, 'person', syllables=(1, 2))}"


# --------------------------------------------------------------------------------------------------
# Relations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """An entity–attribute relation: how to ask it, how a document states it, how values look.

    ``statement`` and ``question`` take ``{entity}`` (and ``{value}``); ``value_kind`` names the
    made-up-name generator (``"person"`` gives a two-word name).
    """

    name: str
    question: str
    statement: str
    value_kind: str

    def value(self, rng: random.Random) -> str:
        if self.value_kind == "person":
            return _person(rng)
        return made_up_name(rng, self.value_kind)


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in [
        Relation("capital", "What is the capital of {entity}?", "The capital of {entity} is {value}.", "city"),
        Relation("currency", "What is the currency of {entity}?", "The currency of {entity} is the {value}.", "currency"),
        Relation("founder", "Who founded {entity}?", "{entity} was founded by {value}.", "person"),
        Relation("river", "What is the longest river in {entity}?", "The longest river in {entity} is the {value}.", "river"),
        Relation("language", "What is the official language of {entity}?", "The official language of {entity} is {value}.", "language"),
        Relation("mountain", "What is the highest mountain in {entity}?", "The highest mountain in {entity} is Mount {value}.", "mountain"),
    ]
}

# Neutral filler sentences (real common words only, no names that look like an answer) to lengthen
# documents. Each takes {entity}.
_FILLER = [
    "{entity} is known for its {adj} {thing}.",
    "Most people in {entity} live near the {place}.",
    "The climate of {entity} is {climate} for most of the year.",
    "Visitors often describe {entity} as {adj} and {adj2}.",
    "{entity} has a population of about {n} million people.",
    "Farming and {trade} are important to the economy of {entity}.",
    "Every {season}, {entity} holds a festival of {thing}.",
    "The old town of {entity} has many {adj} {building}.",
]
_WORDS = {
    "adj": ["quiet", "green", "busy", "ancient", "colourful", "windy", "friendly", "large", "small", "rocky"],
    "adj2": ["welcoming", "calm", "lively", "clean", "remote", "historic"],
    "thing": ["music", "markets", "gardens", "bridges", "pottery", "bread", "textiles", "boats"],
    "place": ["coast", "hills", "lakes", "forests", "valleys", "plains"],
    "climate": ["mild", "warm", "cold", "dry", "humid", "rainy"],
    "trade": ["fishing", "mining", "weaving", "shipping", "tourism", "forestry"],
    "season": ["spring", "summer", "autumn", "winter"],
    "building": ["churches", "towers", "houses", "squares", "libraries", "bridges"],
}


def _filler(rng: random.Random, entity: str, n: int) -> list[str]:
    out = []
    for t in rng.sample(_FILLER, k=min(n, len(_FILLER))) + [rng.choice(_FILLER) for _ in range(n - len(_FILLER))]:
        slots = {k: rng.choice(v) for k, v in _WORDS.items()}
        slots["n"] = str(rng.randint(2, 40))
        out.append(t.format(entity=entity, **slots))
    return out


def _mix_counts(mix: Mapping[str, float], n: int) -> dict[str, int]:
    """Split ``n`` distractors by the fractions in ``mix`` (largest remainder, deterministic)."""
    bad = [k for k in mix if k not in DISTRACTOR_KINDS]
    if bad:
        raise ValueError(f"Unknown distractor kind(s) {bad}; use {DISTRACTOR_KINDS}.")
    total = float(sum(mix.values()))
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise ValueError(f"The distractor mix needs non-negative weights with a positive sum, got {dict(mix)}.")
    raw = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(raw[k]) for k in mix}
    rest = n - sum(counts.values())
    for k in sorted(mix, key=lambda k: (-(raw[k] - counts[k]), DISTRACTOR_KINDS.index(k)))[:rest]:
        counts[k] += 1
    return counts


def _gold_position(spec: GoldPosition, i: int, n_docs: int, rng: random.Random) -> int:
    if spec is None or spec == "random":
        return rng.randrange(n_docs)
    if isinstance(spec, int):
        pos = spec + n_docs if spec < 0 else spec
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
        pos = int(spec[i % len(spec)])
        pos = pos + n_docs if pos < 0 else pos
    else:
        raise ValueError(f"gold_position must be an int, a list of ints or 'random'; got {spec!r}.")
    if not 0 <= pos < n_docs:
        raise ValueError(f"gold_position {spec!r} is outside 0..{n_docs - 1} for {n_docs} documents.")
    return pos


def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def make_synthetic_qa(
    n_examples: int = 100,
    *,
    n_docs: int = 10,
    relation: str | Sequence[str] = "capital",
    distractors: DistractorKind | str | Mapping[str, float] = "same_relation",
    gold_position: GoldPosition = "random",
    doc_sentences: int = 0,
    seed: int = 0,
) -> list[TaskExample]:
    """Entity–attribute multi-document QA with made-up names (closed-book accuracy ≈ 0).

    Each example asks one relation of one made-up entity (``"What is the capital of Veloria?"``);
    exactly one document states it; the others are distractors.

    Args:
        n_examples: how many examples.
        n_docs: documents per example (1 = gold only).
        relation: a name from :data:`RELATIONS` (``"capital"``, ``"currency"``, ``"founder"``,
            ``"river"``, ``"language"``, ``"mountain"``), a list to draw from per example, or
            ``"mixed"`` for all of them.
        distractors: ``"same_relation"`` (the same relation of other entities: default and
            hardest), ``"same_entity"`` (other relations of the asked entity; at most
            ``len(RELATIONS) - 1`` of them), ``"unrelated"`` (other relations of other entities), or a
            mix such as ``{"same_relation": 0.5, "unrelated": 0.5}`` (counts by largest remainder).
        gold_position: 0-based position of the gold document; an int (negative counts from the
            end), a list cycled over the examples (``[0, 4, 9]``), or ``"random"`` (default; uniform).
        doc_sentences: neutral filler sentences added to every document (document length); the
            fact sentence is put at a random place among them.
        seed: the examples are a pure function of ``(seed, index)`` and the settings.

    Returns:
        ``n_examples`` :class:`TaskExample` records (``task="synthetic_qa"``); each document lists the
        value it states in ``answers`` and its kind (``"gold"``, ``"same_relation"``...) in ``kind``;
        ``distractor_answers`` holds every distractor's value.

    Example:
        >>> ex = make_synthetic_qa(1, n_docs=3, gold_position=1, seed=0)[0]
        >>> [d.text for d in ex.ctxs]
        ['The capital of Vaefeania is Stosturholm.', 'The capital of Grothova is Drulport.', 'The capital of Seisora is Ruceton.']
    """
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}.")
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}.")
    if doc_sentences < 0:
        raise ValueError(f"doc_sentences must be >= 0, got {doc_sentences}.")
    relations = _relation_names(relation)
    mix = {distractors: 1.0} if isinstance(distractors, str) else dict(distractors)
    counts = _mix_counts(mix, n_docs - 1)
    if counts.get("same_entity", 0) > len(RELATIONS) - 1:
        raise ValueError(
            f"{counts['same_entity']} 'same_entity' distractors requested, but an entity has only "
            f"{len(RELATIONS) - 1} other relations: mix in 'same_relation' or 'unrelated' distractors."
        )
    settings = dict(
        n_docs=n_docs, relation=relation if isinstance(relation, str) else list(relations),
        distractors=distractors if isinstance(distractors, str) else dict(mix),
        doc_sentences=doc_sentences, seed=seed,
    )
    return [
        _synthetic_example(i, relations=relations, counts=counts, gold_position=gold_position, settings=settings)
        for i in range(n_examples)
    ]


def _relation_names(relation: str | Sequence[str]) -> list[str]:
    """The relation names to draw from (``"mixed"``: all of them); an unknown name raises."""
    if relation == "mixed":
        relations = list(RELATIONS)
    elif isinstance(relation, str):
        relations = [relation]
    else:
        relations = list(relation)
    bad = [r for r in relations if r not in RELATIONS]
    if bad or not relations:
        raise ValueError(f"Unknown relation(s) {bad or relation!r}; use {list(RELATIONS)} or 'mixed'.")
    return relations


def _fresh(gen, used: set[str]) -> str:
    """A value of ``gen()`` that neither equals nor contains (nor is contained in) one already ``used``."""
    for _ in range(1000):
        x = gen()
        k = _norm(x)
        if k not in used and all(k not in u and u not in k for u in used):
            used.add(k)
            return x
    raise RuntimeError("could not draw a fresh made-up name")  # pragma: no cover


def _synthetic_doc(ent: str, r: Relation, val: str, kind: str, rng: random.Random, doc_sentences: int) -> Document:
    sentences = _filler(rng, ent, doc_sentences)
    sentences.insert(rng.randint(0, len(sentences)), r.statement.format(entity=ent, value=val))
    return Document(
        title=ent, text=" ".join(sentences), isgold=kind == "gold", hasanswer=kind == "gold",
        answers=[val], kind=kind, extra={"relation": r.name},
    )


def _synthetic_example(
    i: int, *, relations: list[str], counts: dict[str, int], gold_position: GoldPosition, settings: dict
) -> TaskExample:
    """Example ``i`` of :func:`make_synthetic_qa`: a pure function of ``(seed, i)`` and the settings."""
    seed, n_docs, doc_sentences = settings["seed"], settings["n_docs"], settings["doc_sentences"]
    q_rng = random.Random(f"synthetic_qa:{seed}:{i}:question")
    d_rng = random.Random(f"synthetic_qa:{seed}:{i}:distractors")
    p_rng = random.Random(f"synthetic_qa:{seed}:{i}:order:{n_docs}")
    rel = RELATIONS[q_rng.choice(relations)]
    entity = made_up_name(q_rng, "entity")
    value = rel.value(q_rng)
    gold = _synthetic_doc(entity, rel, value, "gold", d_rng, doc_sentences)
    docs = _distractor_docs(rel, entity, value, counts, d_rng, doc_sentences)
    p_rng.shuffle(docs)
    pos = _gold_position(gold_position, i, n_docs, p_rng)
    docs.insert(pos, gold)
    return TaskExample(
        question=rel.question.format(entity=entity),
        answers=[value],
        ctxs=docs,
        gold_index=pos,
        distractor_answers=[d.answers[0] for d in docs if not d.isgold],
        task="synthetic_qa",
        meta={
            **settings, "index": i, "relation_name": rel.name, "entity": entity,
            "answer_prefix": rel.statement.format(entity=entity, value="\0").split("\0")[0],
        },
        id=f"synthetic_qa-s{seed}-{i}",
        template="qa",
    )


def _distractor_docs(
    rel: Relation, entity: str, value: str, counts: dict[str, int], d_rng: random.Random, doc_sentences: int
) -> list[Document]:
    """The distractor documents of one example, drawn after its gold document from the same ``d_rng``."""
    used_names = {_norm(entity)}
    used_values = {_norm(value)}
    others_rel = [r for r in RELATIONS.values() if r.name != rel.name]
    same_entity_rels = d_rng.sample(others_rel, k=len(others_rel))
    docs: list[Document] = []
    # Draw kinds in a fixed interleaved order so that n_docs=20 extends n_docs=10's distractors.
    plan = [k for k in DISTRACTOR_KINDS for _ in range(counts.get(k, 0))]
    se = 0
    for kind in plan:
        if kind == "same_relation":
            ent = _fresh(lambda: made_up_name(d_rng, "entity"), used_names)
            docs.append(_synthetic_doc(ent, rel, _fresh(lambda: rel.value(d_rng), used_values), kind, d_rng, doc_sentences))
        elif kind == "same_entity":
            r = same_entity_rels[se]
            se += 1
            docs.append(_synthetic_doc(entity, r, _fresh(lambda: r.value(d_rng), used_values), kind, d_rng, doc_sentences))
        else:
            ent = _fresh(lambda: made_up_name(d_rng, "entity"), used_names)
            r = d_rng.choice(others_rel)
            docs.append(_synthetic_doc(ent, r, _fresh(lambda: r.value(d_rng), used_values), kind, d_rng, doc_sentences))
    return docs

def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_kv_retrieval(
    n_examples: int = 100,
    *,
    n_docs: int = 10,
    gold_position: GoldPosition = "random",
    key_length: int | None = None,
    seed: int = 0,
) -> list[TaskExample]:
    """LitM key–value retrieval: a JSON object of random UUID pairs; ask the value of one key.

    The "documents" are the ``"key": "value"`` pairs (``doc_i`` is the i-th pair's text); the
    relevant span is the gold pair; ``distractor_answers`` are the other values.

    Args:
        n_examples: how many examples.
        n_docs: key-value pairs per example.
        gold_position: as in :func:`make_synthetic_qa`.
        key_length: truncate keys and values to this many characters (``None``: full 36-character
            UUIDs as in LitM); shorter ones make short prompts for small models.
        seed: examples are a pure function of ``(seed, index)`` and the settings.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}.")
    if key_length is not None and not 4 <= key_length <= 36:
        raise ValueError(f"key_length must be in 4..36 (or None), got {key_length}.")
    out = []
    for i in range(n_examples):
        rng = random.Random(f"kv:{seed}:{i}")
        seen: set[str] = set()
        pairs = []
        while len(pairs) < n_docs:
            k, v = _uuid(rng)[:key_length], _uuid(rng)[:key_length]
            if k in seen or v in seen:
                continue
            seen |= {k, v}
            pairs.append((k, v))
        p_rng = random.Random(f"kv:{seed}:{i}:order")
        pos = _gold_position(gold_position, i, n_docs, p_rng)
        key, value = pairs[0]
        docs = [
            Document(title="", text=f'"{k}": "{v}"', answers=[v], kind="kv_pair") for k, v in pairs[1:]
        ]
        docs.insert(pos, Document(title="", text=f'"{key}": "{value}"', isgold=True, hasanswer=True,
                                  answers=[value], kind="gold"))
        out.append(
            TaskExample(
                question=key,
                answers=[value],
                ctxs=docs,
                gold_index=pos,
                distractor_answers=[v for _, v in pairs[1:]],
                task="kv",
                meta={"n_docs": n_docs, "seed": seed, "index": i, "key_length": key_length},
                id=f"kv-s{seed}-{i}",
                template="kv",
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Multi-key needle in a haystack (RULER)
# --------------------------------------------------------------------------------------------------

_KEY_WORDS = (
    "amber anchor arctic autumn basil beacon birch cedar cobalt comet copper coral crystal dawn delta "
    "ember falcon fern frost garnet glacier harbor hazel indigo iris ivory jasper juniper lagoon lantern "
    "maple marble meadow meteor nectar nova oak onyx orbit pebble pine plume quartz raven ripple saffron "
    "sage sierra silver slate sparrow spruce summit thistle tide timber topaz tulip velvet willow zephyr"
).split()
# RULER's "noise" haystack sentences, plus a few more of the same kind.
_HAYSTACK = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
    "There and back again.", "The river flows to the sea.", "Birds sing in the morning.",
    "The road winds through the hills.", "Clouds drift over the town.", "The wind is cool tonight.",
]


def make_needle(
    n_examples: int = 100,
    *,
    n_docs: int = 20,
    n_needles: int = 4,
    gold_position: GoldPosition = "random",
    chunk_sentences: int = 5,
    seed: int = 0,
) -> list[TaskExample]:
    """RULER-style multi-key needle in a haystack with made-up keys and 7-digit values.

    The "documents" are ``n_docs`` pieces of text: ``n_needles`` needles (``"One of the special
    magic numbers for amber-falcon is: 4821937."``), one of them asked about (the gold, the relevant
    span) and the others distractor needles with other keys, plus ``n_docs - n_needles`` haystack
    chunks of ``chunk_sentences`` filler sentences each.

    Args:
        n_examples: how many examples.
        n_docs: needles + haystack chunks.
        n_needles: needles per example (1 = single needle; the rest are distractor needles).
        gold_position: position of the gold needle among all documents (as in
            :func:`make_synthetic_qa`); distractor needles go to random places.
        chunk_sentences: filler sentences per haystack chunk (the haystack's length).
        seed: examples are a pure function of ``(seed, index)`` and the settings.
    """
    if not 1 <= n_needles <= n_docs:
        raise ValueError(f"need 1 <= n_needles <= n_docs, got n_needles={n_needles}, n_docs={n_docs}.")
    if chunk_sentences < 1:
        raise ValueError(f"chunk_sentences must be >= 1, got {chunk_sentences}.")
    out = []
    for i in range(n_examples):
        rng = random.Random(f"needle:{seed}:{i}")
        keys: list[str] = []
        while len(keys) < n_needles:
            k = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
            if k not in keys and k.split("-")[0] != k.split("-")[1]:
                keys.append(k)
        values: list[str] = []
        while len(values) < n_needles:
            v = str(rng.randint(1_000_000, 9_999_999))
            if v not in values:
                values.append(v)
        needles = [
            Document(title="", text=NEEDLE_SENTENCE.format(key=k, value=v), answers=[v],
                     kind="needle")
            for k, v in zip(keys, values)
        ]
        chunks = [
            Document(title="", text=" ".join(rng.choice(_HAYSTACK) for _ in range(chunk_sentences)),
                     kind="haystack")
            for _ in range(n_docs - n_needles)
        ]
        docs = list(chunks)
        for nd in needles[1:]:
            docs.insert(rng.randint(0, len(docs)), nd)
        gold = needles[0]
        gold.isgold, gold.hasanswer, gold.kind = True, True, "gold"
        p_rng = random.Random(f"needle:{seed}:{i}:order")
        pos = _gold_position(gold_position, i, n_docs, p_rng)
        docs.insert(pos, gold)
        out.append(
            TaskExample(
                question=keys[0],
                answers=[values[0]],
                ctxs=docs,
                gold_index=pos,
                distractor_answers=values[1:],
                task="needle",
                meta={"n_docs": n_docs, "n_needles": n_needles, "chunk_sentences": chunk_sentences,
                      "seed": seed, "index": i},
                id=f"needle-s{seed}-{i}",
                template="needle",
            )
        )
    return out
