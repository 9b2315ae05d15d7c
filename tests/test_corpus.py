"""The offline text corpus: every kind present, evaluation and calibration disjoint."""

from __future__ import annotations

import pytest
import torch

from qcompile import corpus


class ByteTokenizer:
    """One token per UTF-8 byte: enough to check the splits."""

    def encode(self, text):
        return list(text.encode("utf-8"))


TOK = ByteTokenizer()


@pytest.mark.parametrize("kind", corpus.KINDS)
def test_every_kind_has_text(kind):
    assert len(corpus.text(kind)) > 5000


def test_kinds_share_no_text():
    docstrings, code = corpus.text("docstrings"), corpus.text("code")
    assert docstrings[:2000] not in code and code[:2000] not in docstrings
    assert not set(corpus.DOCSTRING_MODULES) & set(corpus.CODE_MODULES)


def test_calibration_never_reads_the_evaluation_tokens():
    seq, reserve = 256, 8192
    batches = corpus.calibration_batches(TOK, 6, seq, reserve=reserve)
    assert [b.shape for b in batches] == [(1, seq)] * 6
    for i, kind in enumerate(corpus.CALIBRATION_KINDS):
        stream = corpus._tokens(TOK, kind)
        mine = batches[i::3]  # dealt round-robin over the kinds
        tail = stream[-len(mine) * seq :]
        assert torch.equal(torch.cat([b[0] for b in mine]), tail)
        assert stream.numel() - tail.numel() >= reserve
        assert torch.equal(corpus.eval_tokens(TOK, kind, 100)[0], stream[:100])


def test_bad_requests_say_what_to_change():
    with pytest.raises(ValueError, match="unknown text kind 'poetry'"):
        corpus.text("poetry")
    with pytest.raises(ValueError, match="do not fit"):
        corpus.calibration_batches(TOK, 3, 10**7)
    with pytest.raises(ValueError, match="n_tokens"):
        corpus.eval_tokens(TOK, "legal", 1)
