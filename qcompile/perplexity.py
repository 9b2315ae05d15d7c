"""Perplexity and calibration text from ``pydoc_data.topics``.

``pydoc_data.topics`` ships with every CPython (~465k characters of English
prose and code), so evaluation needs no download. The text is split in two
disjoint regions of one tokenization of :func:`dev_text`:

* perplexity uses the FIRST ``n_tokens`` tokens (:func:`dev_tokens`);
* calibration takes its batches from the END of the text
  (:func:`calibration_batches`) and never touches the first
  ``reserve`` tokens (8192 by default), so calibrating on it and then
  measuring perplexity on up to 8192 tokens never sees the same text twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import progress

#: Calibration never reads the first ``PERPLEXITY_RESERVE`` dev tokens.
PERPLEXITY_RESERVE = 8192


def dev_text() -> str:
    """All ``pydoc_data.topics`` entries joined in sorted key order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _encode(tokenizer, text: str) -> list[int]:
    try:
        # verbose=False: no "longer than the model's maximum length" warning.
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:  # a minimal tokenizer with ``encode(text)`` only
        return list(tokenizer.encode(text))


def _all_tokens(tokenizer) -> torch.Tensor:
    """The whole dev text as a 1-D LongTensor, without special tokens."""
    return torch.tensor(_encode(tokenizer, dev_text()), dtype=torch.long)


def dev_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of :func:`dev_text`, as a ``[1, n_tokens]`` LongTensor."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    ids = _all_tokens(tokenizer)
    if ids.numel() < n_tokens:
        raise ValueError(
            f"the dev text has only {ids.numel()} tokens with this tokenizer, "
            f"{n_tokens} were requested"
        )
    return ids[:n_tokens].unsqueeze(0)


def calibration_batches(
    tokenizer,
    n_batches: int,
    seq_len: int,
    offset: int = 0,
    *,
    reserve: int = PERPLEXITY_RESERVE,
) -> list[torch.Tensor]:
    """``n_batches`` LongTensors ``[1, seq_len]`` taken from the END of the dev text.

    The batches are consecutive and cover the ``n_batches * seq_len`` tokens that
    end ``offset`` tokens before the end of the text (so different ``offset`` values
    give disjoint calibration sets). Raises ``ValueError`` if that region would
    reach into the first ``reserve`` tokens, which belong to perplexity.
    """
    if n_batches < 1 or seq_len < 1 or offset < 0:
        raise ValueError(
            f"need n_batches >= 1, seq_len >= 1, offset >= 0; got {n_batches}, {seq_len}, {offset}"
        )
    ids = _all_tokens(tokenizer)
    end = ids.numel() - offset
    start = end - n_batches * seq_len
    if start < reserve:
        raise ValueError(
            f"{n_batches} x {seq_len} calibration tokens at offset {offset} do not fit: "
            f"the dev text has {ids.numel()} tokens and the first {reserve} are "
            f"reserved for perplexity"
        )
    region = ids[start:end]
    return [region[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(n_batches)]


def _logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: Callable,
    tokens: torch.Tensor,
    context: int = 512,
    batch_size: int = 1,
) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping ``context``-token windows.

    ``tokens`` is ``[1, N]`` (or ``[N]``). The windows are ``tokens[k*context :
    (k+1)*context]``; a shorter final window is evaluated too when it has at least
    two tokens. Every window predicts its positions 1..L-1 from the preceding ones
    and the mean is over all predicted positions of all windows. ``model`` is any
    callable taking ``input_ids [B, L]`` and returning logits ``[B, L, V]``, or an
    object with ``.logits`` (a Hugging Face model, a compiled one).
    """
    if context < 2:
        raise ValueError(f"context must be at least 2, got {context}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = tokens.reshape(-1).long()
    n_full = ids.numel() // context
    windows = list(ids[: n_full * context].view(n_full, context))
    tail = ids[n_full * context :]
    if tail.numel() >= 2:
        windows.append(tail)
    if not windows:
        raise ValueError(f"need at least 2 tokens, got {ids.numel()}")

    device = _device_of(model)
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    i = 0
    bar = progress.bar(total=len(windows), desc="perplexity")
    while i < len(windows):
        # A batch holds windows of one length (the short tail runs on its own).
        length = windows[i].numel()
        j = i
        while j < len(windows) and j - i < batch_size and windows[j].numel() == length:
            j += 1
        batch = torch.stack(windows[i:j]).to(device)
        logits = _logits(model(batch))
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        nll += loss.double().cpu()
        count += batch[:, 1:].numel()
        bar.update(j - i)
        i = j
    bar.close()
    return float(torch.exp(nll / count))
