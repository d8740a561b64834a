"""Benchmark `gradfree capture` on a real model: hook/statistics overhead and peak memory.

1. Overhead: plain forward passes (torch.inference_mode, no statistics) over the same batches
   that the capture runs, against the capture's batch loop with the default sites
   (resid_pre + final.normed, full float64 covariances). Two baselines are reported: the full LM
   (with logits) and the forward pass cut after the final norm (what the capture needs; it never
   computes logits). Goal: < 10 % overhead.
2. Memory: captures of increasing token counts, each in a fresh subprocess, report the RSS after
   loading the model and the peak RSS during the capture alone (Linux: the peak is reset through
   ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere ``ru_maxrss``, which then includes
   the model load). It must stay flat as tokens grow.

Timings are wall-clock and CPU seconds (all threads). Both are noisy on a busy machine (OpenMP
threads spin when cores are oversubscribed): run it on an idle one for the record.

    .venv/bin/python scripts/bench_capture.py          # 8k tokens timed, best of 3; RSS at 2k-32k
    .venv/bin/python scripts/bench_capture.py --quick  # 1k tokens timed once; RSS at 512, 1k, 2k

3. Sequential (``--only sequential``): the same capture (default sites, 32 tour-guide
   calibration blurbs) of the 1.5B teacher, whole-model (``load_model``) against layer by layer
   (``--sequential``: one block's weights in memory at a time), each in its own subprocess: peak
   RSS of the child (``ru_maxrss``: imports, loading and the capture), its wall time, and the
   largest relative difference of any statistic between the two captures.
   Goal: sequential ≤ 30 % of the whole-model peak RSS at ≤ 1.5× its wall time.

    .venv/bin/python scripts/bench_capture.py --only sequential

Not part of the test suite. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    id: str
    text: str


def _load(args: argparse.Namespace) -> tuple[Any, list[Doc]] | None:
    from gradfree.base.errors import GradfreeError
    from gradfree.models import MODELS, is_fetched, load_model
    from gradfree.texts.corpora import load_corpus

    if args.model in MODELS and not is_fetched(args.model):
        print(f"Model {args.model} is not fetched; run `gradfree models fetch {args.model}` first.")
        return None
    try:
        docs = load_corpus(args.corpus, args.split)
    except GradfreeError as e:
        print(f"Corpus unavailable: {e}")
        return None
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    return loaded, [Doc(d.id, d.text) for d in docs]


def _docs_for(tokenizer: Any, docs: list[Doc], n_tokens: int) -> list[Doc]:
    """Corpus documents in order (cycled with new ids if needed) until ``n_tokens`` tokens."""
    from gradfree.texts.windows import encode

    out: list[Doc] = []
    total, lap = 0, 0
    while total < n_tokens:
        for d in docs:
            ids = encode(tokenizer, d.text)
            take = min(len(ids), n_tokens - total)
            text = d.text if take == len(ids) else tokenizer.decode(ids[:take])
            out.append(Doc(f"{d.id}#{lap}", text))
            total += take
            if total >= n_tokens:
                break
        lap += 1
    return out


def _batches(tokenizer: Any, docs: list[Doc], max_length: int, batch_size: int) -> list[Any]:
    import torch

    from gradfree.texts.windows import iter_windows

    windows = [w for _, w in iter_windows(tokenizer, docs, max_length)]
    pad = tokenizer.pad_token_id or 0
    out = []
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        t = max(len(w) for w in group)
        ids = torch.full((len(group), t), pad, dtype=torch.long)
        mask = torch.zeros((len(group), t), dtype=torch.long)
        for r, w in enumerate(group):
            ids[r, : len(w)], mask[r, : len(w)] = torch.tensor(w), 1
        out.append((ids, mask))
    return out


def _rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def _time_plain(
    model: Any, batches: list[Any], device: str, to_final_norm: bool
) -> tuple[float, float]:
    import torch

    from gradfree.adapters import get_adapter
    from gradfree.capture import site_hooks

    adapter = get_adapter(model)
    keys = ["final.normed"] if to_final_norm else []
    t0 = _clock()
    with torch.inference_mode(), site_hooks(adapter, keys, lambda k, x: None) as hooks:
        for ids, mask in batches:
            if to_final_norm:
                hooks.forward(ids.to(device), mask.to(device))
            else:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return _since(t0)


def _capture(
    loaded: Any, docs: list[Doc], args: argparse.Namespace, trace: list[float] | None = None
) -> dict[str, Any]:
    from gradfree.capture import run_capture

    cfg = {"max_length": args.max_length, "batch_size": args.batch_size}
    on_batch = None if trace is None else (lambda _b: trace.append(_rss_mb()))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = _clock()
        cap = run_capture(loaded, docs, Path(tmp) / "cap", cfg, progress=False, on_batch=on_batch)
        wall, cpu = _since(t0)
        return {
            "loop_s": cap.manifest["seconds"],
            "loop_cpu_s": cap.manifest["cpu_seconds"],
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens": cap.tokens("model"),
        }


def _child(args: argparse.Namespace) -> None:
    got = _load(args)
    if got is None:
        sys.exit(3)
    loaded, docs = got
    docs = _docs_for(loaded.tokenizer, docs, args.child)
    warm = _batches(loaded.tokenizer, docs[:1], 16, 1)
    _time_plain(loaded.model, warm, args.device, False)  # page the (memory-mapped) weights in
    import torch

    with torch.no_grad():  # a forward pass touches only the embedding rows of its own tokens
        for p in loaded.model.parameters():
            p.sum()
    rss_loaded = _rss_mb()
    reset = _reset_peak()
    trace: list[float] = []  # RSS after every batch: growth that stops is allocator warm-up
    result = _capture(loaded, docs, args, trace)
    half = trace[len(trace) // 2 :]
    result["rss_first_batch_mb"] = trace[0] if trace else float("nan")
    result["rss_second_half_growth_mb"] = (half[-1] - half[0]) if half else float("nan")
    result["batches"] = len(trace)
    result["rss_loaded_mb"] = rss_loaded
    result["peak_rss_mb"] = _rss_mb("VmHWM") if reset else _rss_mb("ru_maxrss")
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--corpus", default="tourguide")
    p.add_argument("--split", default="calibration")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--timing-tokens", type=int, default=8192)
    p.add_argument("--rss-tokens", default="2048,8192,32768")
    p.add_argument("--repeats", type=int, default=3, help="Timing repeats (fastest reported).")
    p.add_argument("--quick", action="store_true", help="1k tokens timed; RSS at 512, 1k, 2k.")
    p.add_argument("--only", choices=("timing", "rss", "sequential"), help="Run one part.")
    p.add_argument("--seq-model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--seq-limit", type=int, default=32, help="Documents of the sequential part.")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seq-child", choices=("whole", "sequential"), help=argparse.SUPPRESS)
    p.add_argument("--seq-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.timing_tokens, args.rss_tokens, args.repeats = 1024, "512,1024,2048", 1
    if args.child:
        _child(args)
        return
    if args.seq_child:
        _seq_child(args)
        return
    if args.only == "sequential":
        _sequential_table(args)
        return
    if args.only != "rss":
        _timing(args)
    if args.only != "timing":
        _rss_table(args)


def _seq_child(args: argparse.Namespace) -> None:
    """One capture of the sequential comparison, whole or sequential, in this process."""
    t0 = time.perf_counter()
    from gradfree.capture.corpus import capture_corpus
    from gradfree.capture.sequential import capture_corpus_sequential

    run = capture_corpus_sequential if args.seq_child == "sequential" else capture_corpus
    cap = run(
        args.seq_model,
        args.corpus,
        args.seq_out,
        {"max_length": args.max_length, "batch_size": args.batch_size},
        split=args.split,
        limit=args.seq_limit,
        device=args.device,
        dtype=args.dtype,
        progress=False,
    )
    result = {
        "wall_s": time.perf_counter() - t0,  # imports, loading, capture and writing
        "loop_s": cap.manifest["seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens": cap.tokens("model"),
        "windows": cap.manifest["windows"],
    }
    print("RESULT " + json.dumps(result))


def _max_rel_diff(a: Any, b: Any) -> float:
    """The largest relative difference (max |Δ| / max |x| per tensor) over every statistic."""
    worst = 0.0
    for key in a.keys("model"):
        for part in ("head", "body"):
            sa, sb = a.stats("model", key, part), b.stats("model", key, part)
            for f in ("sum", "m2", "m3", "m4", "absmax"):
                x, y = getattr(sa, f), getattr(sb, f)
                scale = float(x.abs().max())
                worst = max(worst, float((x - y).abs().max()) / scale if scale else 0.0)
    return worst


def _sequential_table(args: argparse.Namespace) -> None:
    from gradfree.capture import load_capture
    from gradfree.models import MODELS, is_fetched

    if args.seq_model in MODELS and not is_fetched(args.seq_model):
        print(
            f"Model {args.seq_model} is not fetched; run `gradfree models fetch {args.seq_model}`."
        )
        return
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("whole", "sequential"):
            out = Path(tmp) / mode
            cmd = [sys.executable, __file__, "--seq-child", mode, "--seq-out", str(out)]
            for flag in ("seq_model", "seq_limit", "corpus", "split", "device", "dtype"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            cmd += ["--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{mode} capture failed: {proc.stderr.strip().splitlines()[-3:]}")
                return
            rows[mode] = json.loads(line[len("RESULT ") :])
        diff = _max_rel_diff(
            load_capture(Path(tmp) / "whole"), load_capture(Path(tmp) / "sequential")
        )
    w = rows["whole"]
    print(
        f"\n## Whole-model vs sequential capture ({args.seq_model}, {args.device}, {args.dtype}, "
        f"{args.corpus}:{args.split} limit {args.seq_limit}: {w['tokens']} tokens in "
        f"{w['windows']} windows, default sites)\n"
    )
    print("| capture | peak RSS (MB) | vs whole | wall (s) | vs whole | capture loop (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['peak_rss_mb']:.0f} "
            f"| {100 * r['peak_rss_mb'] / w['peak_rss_mb']:.0f} % "
            f"| {r['wall_s']:.1f} | {r['wall_s'] / w['wall_s']:.2f}× | {r['loop_s']:.1f} |"
        )
    print(f"\nlargest relative difference of any statistic: {diff:.2e}")


def _timing(args: argparse.Namespace) -> None:
    got = _load(args)
    if got is None:
        return
    loaded, corpus = got
    import torch

    torch.manual_seed(0)
    docs = _docs_for(loaded.tokenizer, corpus, args.timing_tokens)
    batches = _batches(loaded.tokenizer, docs, args.max_length, args.batch_size)
    _time_plain(loaded.model, batches[:1], args.device, False)  # warm-up
    _time_plain(loaded.model, batches[:1], args.device, True)
    runs = []
    for _ in range(args.repeats):  # interleaved; the fastest of each kind is reported
        runs.append(
            (
                _time_plain(loaded.model, batches, args.device, False),
                _time_plain(loaded.model, batches, args.device, True),
                _capture(loaded, docs, args),
            )
        )
    full = min(r[0] for r in runs)
    trunk = min(r[1] for r in runs)
    cap = min((r[2] for r in runs), key=lambda c: c["loop_s"])
    loop = (cap["loop_s"], cap["loop_cpu_s"])
    print(
        f"\n## Capture overhead ({args.model}, {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, {cap['tokens']} tokens in {len(batches)} batches)\n"
    )
    print("| run | wall (s) | CPU (s) | capture overhead, wall | capture overhead, CPU |")
    print("|---|---:|---:|---:|---:|")
    for name, (w, c) in (
        ("plain forward, full LM (logits)", full),
        ("plain forward to final norm", trunk),
    ):
        print(
            f"| {name} | {w:.2f} | {c:.2f} | {100 * (loop[0] / w - 1):+.1f} % "
            f"| {100 * (loop[1] / c - 1):+.1f} % |"
        )
    print(f"| capture loop (default sites) | {loop[0]:.2f} | {loop[1]:.2f} | | |")
    whole = f"{cap['wall_s']:.2f} | {cap['cpu_s']:.2f}"
    print(f"| capture, whole call (tokenize + loop + write) | {whole} | | |")


def _rss_table(args: argparse.Namespace) -> None:
    print("\n## Peak RSS vs tokens (one subprocess each)\n")
    print(
        "| tokens | batches | RSS after load + warm-up (MB) | RSS after batch 1 (MB) "
        "| peak RSS during capture (MB) | RSS growth over the last half of the batches (MB) "
        "| capture loop (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in args.rss_tokens.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n)]
        for flag in ("model", "corpus", "split", "device", "dtype", "max_length", "batch_size"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {n} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | | |")
            continue
        r = json.loads(line[len("RESULT ") :])
        print(
            f"| {r['tokens']} | {r['batches']} | {r['rss_loaded_mb']:.0f} "
            f"| {r['rss_first_batch_mb']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_second_half_growth_mb']:+.0f} | {r['loop_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
