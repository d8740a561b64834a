"""Render results.json of scripts/compress_real.py as a markdown table (stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

rows = json.loads(Path(sys.argv[1]).read_text())
base = rows["student"]
print("| variant | tour KL(teacher‖model) | tour ppl | tour top-1 | news ppl | news vs student |")
print("|---|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    rel = r["news_ppl"] / base["news_ppl"] - 1
    print(
        f"| {name} | {r['tour_kl']:.3f} | {r['tour_ppl']:.1f} | {r['tour_top1']:.3f} | "
        f"{r['news_ppl']:.1f} | {rel:+.1%} |"
    )
print(f"\nteacher tour ppl {base['teacher_tour_ppl']:.2f}; {base['tokens']} scored tour tokens")
