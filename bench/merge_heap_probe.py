"""Where a merge's peak RSS goes: glibc heap in use, heap free but resident, mapped blocks, files.

    .venv/bin/python bench/merge_heap_probe.py --model DIR --other DIR [-n 6] [--glibc-default]

Runs ``dft.merging.merge_models`` (SLERP, ``conf/merge/slerp.yaml``) ``-n`` times, each in a fresh
process, with a thread sampling ``/proc/self/status`` and glibc's ``mallinfo2`` every 5 ms; prints,
at the moment of peak RSS, ``RssAnon``/``RssFile`` and the heap's bytes in use (``uordblks``),
free but still resident (``fordblks``), and in blocks with their own mapping (``hblkhd``), all MB.
``--glibc-default`` replaces dft's allocator setting for the merge
(``dft.merging.backend.large_blocks_returned_to_os``) by a no-op. glibc >= 2.33 only.
``bench/merge_bench.py`` is the side-by-side with mergekit's CLI; this explains its RSS column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import contextlib, json, sys, threading, time

from omegaconf import OmegaConf
import dft.merging.backend as backend
from dft.merging import merge_models
import mergekit.merge

peak = {"rss": 0}

def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            key, val = line.split(":")
            out[key] = int(val.split()[0]) // 1024
    return out

def sample():
    while True:
        s, m = status(), backend.malloc_stats()
        if s["VmRSS"] > peak["rss"]:
            peak.update(rss=s["VmRSS"], anon=s["RssAnon"], file=s["RssFile"], heap_used=m["heap_in_use"] >> 20,
                        heap_free=m["heap_free"] >> 20, mapped=m["mapped"] >> 20)
        time.sleep(0.005)

if sys.argv[4] == "glibc-default":
    backend.large_blocks_returned_to_os = contextlib.nullcontext
threading.Thread(target=sample, daemon=True).start()
cfg = OmegaConf.load(sys.argv[5])
info = merge_models(cfg, sys.argv[1], sys.argv[2], sys.argv[3])
time.sleep(0.05)
print("PROBE " + json.dumps({**peak, "merge_s": round(info["seconds"], 2)}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="partner checkpoint (HF dir)")
    ap.add_argument("--other", type=Path, required=True, help="fine-tuned checkpoint (HF dir), same shapes")
    ap.add_argument("-n", "--repeats", type=int, default=6)
    ap.add_argument("--glibc-default", action="store_true", help="without dft's allocator setting")
    args = ap.parse_args(argv)
    for flag, path in (("--model", args.model), ("--other", args.other)):
        if not (path / "config.json").is_file():
            ap.error(f"{flag} {path}: not a model folder (no config.json)")
    from dft.merging.backend import malloc_stats

    if malloc_stats() is None:
        sys.exit("merge_heap_probe: needs glibc >= 2.33 (mallinfo2)")
    mode = "glibc-default" if args.glibc_default else "dft"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.other), str(args.model), f"{tmp}/out{i}", mode,
                                  str(ROOT / "conf" / "merge" / "slerp.yaml")],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            row = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")][-1][6:])
            rows.append(row)
            print(f"run {i + 1} ({mode}): peak RSS {row['rss']} MB = anon {row['anon']} + file {row['file']}; "
                  f"heap in use {row['heap_used']}, heap free {row['heap_free']}, mapped blocks {row['mapped']}; "
                  f"merge_models {row['merge_s']} s", flush=True)
    print(f"median peak RSS {statistics.median(r['rss'] for r in rows):.0f} MB, max {max(r['rss'] for r in rows)} MB; "
          f"heap free at peak: {sorted(r['heap_free'] for r in rows)} MB")


if __name__ == "__main__":
    main()
