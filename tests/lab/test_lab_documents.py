"""The tiny LM's pretraining documents: the loss falls on the answers only, each step's batch is
fixed however the run gets there, and the plain-text share weighs every token."""

from __future__ import annotations

import random

import pytest
import torch

from llava_lite.conversation import IGNORE, get_template
from llava_lite.lab.config import LMDocuments
from llava_lite.lab.documents import (
    CAPTION_PROMPT,
    DocStream,
    content_key,
    reading_documents,
    scene_questions,
    stream_batches,
)
from llava_lite.scene_text import reading_context


def _entries(scene: str) -> dict[str, list[str]]:
    """Each line of a scene table, its entries sorted (a line lists the objects in its own order)."""
    return {k: sorted(v.split(", ")) for k, v in (line.split(": ", 1) for line in scene.split("\n"))}


def test_reading_document_loss_mask_covers_exactly_the_answers(small_tokenizer):
    tok, contexts = small_tokenizer
    docs = reading_documents(contexts[:20], random.Random(0), qa_per_doc=5, caption_share=0.0)
    template = get_template("roles", tok)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert len(docs) == 20
    for ctx, doc in zip(contexts, docs):
        enc = template.encode(doc)
        ids, labels = enc.input_ids, enc.labels
        # the supervised tokens, split at <|end|>, are exactly the answers in order
        supervised = [i for i, label in zip(ids, labels) if label != IGNORE]
        assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
        answers, cur = [], []
        for i in supervised:
            if i == end:
                answers.append(tok.decode(cur).strip())
                cur = []
            else:
                cur.append(i)
        assert not cur
        assert answers == [t["value"] for t in doc if t["from"] == "gpt"]
        # the first turn is the scene in the sized layout (its lines in an order of their own), then a question
        scene, question = doc[0]["value"].rsplit("\n", 1)
        assert _entries(scene) == _entries(reading_context(ctx)) and ": " not in question


def test_caption_documents_ask_for_a_caption_and_answer_with_one_of_the_scenes(small_tokenizer):
    _, contexts = small_tokenizer
    docs = reading_documents(contexts, random.Random(1), qa_per_doc=4, caption_share=0.5)
    captioned = [(c, d) for c, d in zip(contexts, docs) if d[0]["value"].endswith(CAPTION_PROMPT)]
    assert 30 < len(captioned) < 90 and len(docs) == len(contexts)
    for ctx, doc in captioned:
        assert len(doc) == 2 and doc[1]["value"] in ctx.captions


def test_scene_questions_never_ask_one_question_twice_in_other_words(small_tokenizer):
    _, contexts = small_tokenizer
    rng, asked = random.Random(0), 0
    for ctx in contexts:
        qas = scene_questions(ctx, rng, 12)
        keys = [content_key(qa) for qa in qas]
        assert len(set(keys)) == len(keys) and len({qa.question for qa in qas}) == len(qas)
        assert 1 <= len(qas) <= 12
        asked += len(qas)
    assert asked > 8 * len(contexts)


def test_plain_text_share_weighs_every_token_and_the_answers_fully(small_tokenizer):
    tok, contexts = small_tokenizer
    template = get_template("roles", tok)
    for share, low in ((1.0, 0.2), (0.0, 0.0)):
        stream = DocStream(
            contexts, template, LMDocuments(qa_per_doc=3, text_share=share, text_weight=0.2), 6, 0, tok.pad_token_id
        )
        ids, weights = stream.batch(0)  # [B, T]
        real = ids != tok.pad_token_id
        assert weights[real].unique().tolist() == pytest.approx([low, 1.0])
        assert (weights[~real] == 0).all()
        answers = (weights == 1.0).sum(1)
        assert (answers > 0).all() and (answers < real.sum(1)).all()


def test_documents_are_read_in_the_sized_layout_only():
    with pytest.raises(ValueError, match="layout 'table'"):
        LMDocuments(layout="table")


def test_a_step_gets_the_same_batch_from_a_fresh_stream(small_tokenizer):
    tok, contexts = small_tokenizer
    docs = LMDocuments(qa_per_doc=2, length_group=4, text_share=0.5)
    make = lambda seed: DocStream(contexts[:50], get_template("roles", tok), docs, 3, seed, tok.pad_token_id)
    a, b = make(0), make(0)
    for s in (5, 0, 9, 5):  # in any order, across length groups
        assert all(torch.equal(x, y) for x, y in zip(a.batch(s), b.batch(s)))
    assert not torch.equal(a.batch(4)[0], a.batch(8)[0]) or not torch.equal(a.batch(4)[1], a.batch(8)[1])
    assert not all(torch.equal(x, y) for x, y in zip(make(0).batch(1), make(1).batch(1)))  # the seed draws them
    lengths = [int((a.batch(s)[0] != tok.pad_token_id).sum(1).max()) for s in range(4)]
    assert lengths == sorted(lengths)  # a length group is sorted: short documents share batches


def test_background_workers_build_the_same_batches_from_any_step(small_tokenizer):
    tok, contexts = small_tokenizer
    docs = LMDocuments(qa_per_doc=2, length_group=4, text_share=0.5)
    stream = DocStream(contexts[:50], get_template("roles", tok), docs, 3, 0, tok.pad_token_id)
    for start, steps in ((0, 8), (5, 11), (7, 8)):
        inline = [stream.batch(s) for s in range(start, steps)]
        built = list(stream_batches(stream, start, steps, workers=2))
        assert len(built) == steps - start
        for (ids, w), (ids2, w2) in zip(inline, built):
            assert torch.equal(ids, ids2) and torch.equal(w, w2)
