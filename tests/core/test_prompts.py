import pytest

from focuslens.core.prompts import Segment, Span, as_span, build_prompt


def _parts(n=3):
    parts = ["Write an answer using the documents.\n\n"]
    for i in range(1, n + 1):
        parts += [(f"doc_{i}", f"Document [{i}](Title: T{i}) The capital of Land{i} is City{i}."), "\n"]
    parts += ["\nQuestion: ", ("question", "What is the capital of Land2?"), "\nAnswer:"]
    return parts


@pytest.mark.parametrize("chat", [False, True])
def test_ids_equal_whole_text_tokenisation_and_spans_decode(tok, chat):
    p = build_prompt(tok, _parts(), chat=chat)
    whole = tok(p.text, add_special_tokens=not chat).input_ids
    if not chat:
        assert whole[0] == tok.bos_token_id
    assert p.tokens.tolist() == whole
    assert (p.tokens == tok.bos_token_id).sum() <= 1
    for name in p.order:
        a, b = p.char_spans[name]
        assert tok.decode(p.tokens[p.spans[name].slice]).strip() == p.text[a:b].strip()
    spans = [p.spans[n] for n in p.order]
    assert all(x.end <= y.start for x, y in zip(spans, spans[1:]))


def test_chat_template_single_bos_on_smollm(smollm):
    p = build_prompt(smollm.tokenizer, _parts(), chat=True)
    assert p.tokens.tolist() == smollm.tokenizer(p.text, add_special_tokens=False).input_ids
    assert int((p.tokens == smollm.tokenizer.bos_token_id).sum()) == p.text.count("<|im_start|>")
    assert p.text.startswith("<|im_start|>system")
    for name in p.order:
        assert p.decode(smollm.tokenizer, name).strip() == p.text[slice(*p.char_spans[name])].strip()


def test_response_as_text_and_as_ids(tok):
    p = build_prompt(tok, _parts(), chat=True)
    q = p.with_response(tok, "City2 is the capital.")
    assert q.tokens.tolist() == tok(q.text, add_special_tokens=False).input_ids
    assert q.decode(tok, "response").strip() == "City2 is the capital."
    assert q.spans["doc_1"] == p.spans["doc_1"]
    ids = tok("City2", add_special_tokens=False).input_ids
    r = p.with_response(tok, ids)
    assert r.response == Span(len(p), len(p) + len(ids))
    assert r.tokens[len(p):].tolist() == ids
    with pytest.raises(ValueError, match="empty"):
        p.with_response(tok, "  ")
    with pytest.raises(ValueError, match="already"):
        q.with_response(tok, "again", name="response")


def test_merged_token_is_owned_and_reported(tok):
    # No separator between the two segments: the tokenizer may merge across the boundary.
    p = build_prompt(tok, [("a", "The capital of Marn is Pel"), ("b", "l. The capital")])
    assert p.spans["a"].end <= p.spans["b"].start
    for idx, owner, others in p.merged_tokens:
        assert owner in ("a", "b") and set(others) <= {"a", "b"}
        assert p.spans[owner].start <= idx < p.spans[owner].end


@pytest.mark.parametrize(
    "parts, msg",
    [
        ([("doc", "x y"), ("doc", "z")], "Duplicate segment name"),
        ([("doc", "   ")], "empty"),
        (["only glue"], "at least one named segment"),
        ([("", "text")], "non-empty"),
    ],
)
def test_bad_segments(tok, parts, msg):
    with pytest.raises(ValueError, match=msg):
        build_prompt(tok, parts)


def test_too_long_prompt(tok):
    with pytest.raises(ValueError, match="context"):
        build_prompt(tok, [("doc", "word " * 200)], max_length=50)


def test_as_span_validation():
    assert as_span((2, 5)) == Span(2, 5)
    assert as_span(slice(1, 3)) == Span(1, 3)
    assert as_span(Span(0, 1), seq_len=1) == Span(0, 1)
    with pytest.raises(ValueError, match="outside"):
        as_span((3, 12), seq_len=10, name="relevant")
    with pytest.raises(ValueError, match="empty"):
        as_span((3, 3))
    with pytest.raises(ValueError):
        as_span((5, 2))
    with pytest.raises(TypeError):
        as_span(7)
    assert len(Span(2, 9)) == 7 and Span(2, 9).slice == slice(2, 9)
    assert isinstance(Segment("a", "b"), Segment)
