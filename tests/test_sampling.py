"""Sampling and the verdict score on a real (tiny) tokenizer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from zoomin.runtime.sampling import Sampler, Sampling, VerdictScorer, softmax


def test_greedy_ties_go_to_lowest_id():
    logits = np.array([0.0, 3.0, 3.0, 1.0], dtype=np.float32)
    assert Sampler(Sampling())(logits) == 1


def test_seeded_sampling_is_reproducible_and_respects_top_p():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    draws = [Sampler(Sampling(temperature=1.0, top_p=0.8, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(Sampling(temperature=1.0, top_p=0.8, seed=1))
    seen = {s(logits) for _ in range(300)}
    assert seen == {0, 1}  # 0.6 + 0.3 reach 0.8; the tail is cut


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}])
def test_invalid_sampling(kw):
    with pytest.raises(ValueError):
        Sampling(**kw)


@pytest.fixture(scope="module")
def scorer(tiny_ckpt):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    return tok, VerdictScorer(tok, "<verdict>", "real", "generated", vocab_size=tok.get_vocab_size())


def test_score_only_where_the_word_starts(scorer):
    tok, sc = scorer
    logits = np.zeros(tok.get_vocab_size(), dtype=np.float32)
    assert sc.step("The skin is smooth.", logits) is None
    assert sc.pending_rest("... <verdict>") == ""
    assert sc.pending_rest("... <verdict") == ">"
    assert sc.step("... <verdict>", logits) is not None


@settings(max_examples=30, deadline=None)
@given(boost=st.floats(-8, 8))
def test_score_follows_the_verdict_tokens(scorer, boost):
    tok, sc = scorer
    real_ids, gen_ids = sc._candidates("")
    assert len(real_ids) and len(gen_ids) and not set(real_ids) & set(gen_ids)
    logits = np.zeros(tok.get_vocab_size(), dtype=np.float32)
    logits[gen_ids] += boost
    p = softmax(logits)
    expected = p[gen_ids].sum() / (p[gen_ids].sum() + p[real_ids].sum())
    assert sc.step("x <verdict>", logits) == pytest.approx(expected)
    # every candidate decodes to a piece that commits to its own word
    for i in gen_ids:
        piece = tok.decode([int(i)])
        assert "generated".startswith(piece) or piece.startswith("generated")
