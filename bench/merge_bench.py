"""Side by side: a SLERP merge of two SmolLM2-135M-shaped checkpoints through dft and through the
``mergekit-yaml`` CLI, on the same mergekit config.

    .venv/bin/python bench/merge_bench.py [--model DIR] [--other DIR] [--merge slerp] [-n 3]

Without ``--model`` a random-weight model of SmolLM2-135M's shape (30 layers, hidden 576, vocab
49152, tied embeddings; ~0.54 GB fp32) is generated; without ``--other`` the second checkpoint is
the first plus 1 % Gaussian noise per tensor (a stand-in for a fine-tuned model), sharded like the
first. The random model is saved in shards of `conf/model/smollm2_135m.yaml`'s `max_shard_size`, as
dft saves that model's artefacts (`--shard-size` to change). Both are cached
under ``--workdir`` (default ``bench/out/merge``, gitignored).

With ``--glibc-default`` a third side runs dft's merge without its allocator setting
(``dft.merging.backend.large_blocks_returned_to_os``), to show what that setting changes.

Each merge runs in its own process (the sides alternate, one warm-up round first, untimed), started
by a bare launcher interpreter, so peak RSS (``ru_maxrss`` from ``os.wait4``) is that merge's own
(see ``LAUNCHER``). Reported per side: median wall
time of the process (imports included), for dft also the median time of the ``merge_models``
call alone, peak RSS; then whether the two outputs are tensor-for-tensor equal, and the I/O lower
bound: bytes read + written divided by sequential throughput measured here on the same disk
(a cold read of a file evicted from the page cache, and a write + fsync) and, since the merges
read inputs that are in the page cache, a warm bound as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MERGEKIT_YAML_CLI = str(Path(PY).parent / "mergekit-yaml")

SMOLLM2_135M = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


# ----------------------------------------------------------------------------- checkpoints
def _weights(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _nbytes(files) -> int:
    return sum(f.stat().st_size for f in files)


def make_random_model(out: Path, shard_size: str) -> Path:
    """A random model of SmolLM2-135M's shape with a WordLevel tokenizer of the same vocab size,
    saved in safetensors shards of at most ``shard_size`` (as dft saves its artefacts)."""
    stamp = out / "random_model.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"shard_size": shard_size}:
        return out
    shutil.rmtree(out, ignore_errors=True)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    print(f"generating a random SmolLM2-135M-shaped model in {out} ...", flush=True)
    cfg = LlamaConfig(**SMOLLM2_135M)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size=shard_size)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(cfg.vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        out
    )
    stamp.write_text(json.dumps({"shard_size": shard_size}))
    return out


def make_perturbed(src: Path, out: Path, scale: float = 0.01, seed: int = 1) -> Path:
    """``src`` + ``scale`` * std(tensor) * N(0, 1), tensor by tensor; other files copied."""
    stamp = out / "perturbed_from.json"
    meta = {"src": str(src.resolve()), "scale": scale, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return out
    print(f"writing {out} = {src} + {scale:g} * std * noise ...", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    gen = torch.Generator().manual_seed(seed)
    for f in _weights(src):
        tensors = {}
        with safe_open(str(f), framework="pt") as fh:
            metadata = fh.metadata()
            for name in fh.keys():
                t = fh.get_tensor(name)
                if t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                    t = (t.float() + scale * t.float().std() * noise).to(t.dtype)
                tensors[name] = t
        save_file(tensors, str(out / f.name), metadata=metadata)
    stamp.write_text(json.dumps(meta))
    return out


# ----------------------------------------------------------------------------- measuring
#: Runs the measured command as its own child and reports that child's rusage. On Linux a process's
#: ``ru_maxrss`` keeps the high-water mark of the address space it had before ``exec``: a child forked
#: straight from this bench (torch imported, ~0.7 GB) would inherit that as a floor. This launcher is a
#: bare interpreter (~10 MB), so the peak it reports is the merge's own.
LAUNCHER = """
import json, os, sys, time
cmd, result, log = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1); os.dup2(fd, 2)
    os.execv(cmd[0], cmd)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(result, "w") as fh:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
               "peak_rss_mb": ru.ru_maxrss / 1024}, fh)
"""


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` through :data:`LAUNCHER`; its wall time, CPU time (user + sys) and peak RSS."""
    result = log.with_suffix(".rusage.json")
    subprocess.run([PY, "-c", LAUNCHER, json.dumps(cmd), str(result), str(log)], cwd=ROOT, check=True)
    r = json.loads(result.read_text())
    if r.pop("rc") != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed; see {log}:\n{log.read_text()[-3000:]}")
    return {**r, "log": log}  # CPU time is robust to other users' load, unlike wall time


DFT_CHILD = """
import contextlib, json, sys, time
t0 = time.perf_counter()
from dft.merging import merge_models
import mergekit.merge  # counted as import time, as the CLI's is
t1 = time.perf_counter()
if sys.argv[5:] == ["glibc-default"]:  # --glibc-default: without dft's allocator setting for the merge
    import dft.merging.backend
    dft.merging.backend.large_blocks_returned_to_os = contextlib.nullcontext
cfg = json.loads(sys.argv[1])
info = merge_models(cfg, sys.argv[2], sys.argv[3], sys.argv[4])
print("DFT_RESULT " + json.dumps({"import_s": t1 - t0, "merge_s": info["seconds"]}))
"""


IMPORT_CHILD = "from dft.merging import merge_models\nimport mergekit.merge\n"


def throughput(workdir: Path, nbytes: int) -> dict:
    """Sequential write (+fsync) and read throughput of the disk under ``workdir``, in bytes/s.

    The read is cold: the file's pages are evicted with POSIX_FADV_DONTNEED first (this file
    only; nobody else's cache is touched). A second read gives the page-cache (warm) rate.
    """
    path = workdir / "throughput.tmp"
    block = os.urandom(1 << 20) * 16  # 16 MiB
    n = max(1, nbytes // len(block))
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(n):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    write_s = time.perf_counter() - t0
    size = n * len(block)

    def read() -> float:
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            while fh.read(len(block)):
                pass
        return time.perf_counter() - t

    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    cold_s = read()
    warm_s = read()
    path.unlink()
    return {"write_Bps": size / write_s, "read_cold_Bps": size / cold_s, "read_warm_Bps": size / warm_s}


def compare_outputs(a: Path, b: Path) -> dict:
    ta = {k: v for f in _weights(a) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in _weights(b) for k, v in load_file(str(f)).items()}
    if set(ta) != set(tb):
        return {"equal": False, "why": f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}"}
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    max_diff = max((float((ta[k].float() - tb[k].float()).abs().max()) for k in unequal), default=0.0)
    return {"equal": not unequal, "n_tensors": len(ta), "n_unequal": len(unequal), "max_abs_diff": max_diff}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="first checkpoint (HF dir); default: random SmolLM2-135M shape")
    ap.add_argument("--other", type=Path, help="second checkpoint; default: --model + 1%% noise")
    ap.add_argument("--merge", default="slerp", help="conf/merge/<name>.yaml to use (default slerp)")
    ap.add_argument("-n", "--repeats", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "merge")
    ap.add_argument("--shard-size", default=None,
                    help="shard size of the generated random model (default: conf/model/smollm2_135m.yaml's "
                         "max_shard_size, as dft saves that model's artefacts)")
    ap.add_argument("--glibc-default", action="store_true",
                    help="also run dft without its allocator setting for the merge "
                         "(dft.merging.backend.large_blocks_returned_to_os), as a third side")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from dft.config import MergeConfig
    from dft.merging import build_merge_config
    from dft.merging.backend import _largest_shard

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shard_size = args.shard_size or OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml").max_shard_size
    model = (args.model or make_random_model(work / "model", shard_size)).resolve()
    other = (args.other or make_perturbed(model, work / "other")).resolve()
    merge_cfg = OmegaConf.merge(OmegaConf.structured(MergeConfig), OmegaConf.load(ROOT / "conf" / "merge" / f"{args.merge}.yaml"))
    cfg_json = json.dumps(OmegaConf.to_container(merge_cfg))
    # The same mergekit config for both: dft's (partner = base_model = --model, fine-tuned = --other).
    mk_yaml = work / "mergekit.yaml"
    mk_yaml.write_text(build_merge_config(merge_cfg, str(other), str(model)).to_yaml() + "\n")
    out_dft, out_cli = work / "out_dft", work / "out_cli"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    cmds = {
        "dft": [PY, "-c", DFT_CHILD, cfg_json, str(other), str(model), str(out_dft)],
        "dft-glibc": [PY, "-c", DFT_CHILD, cfg_json, str(other), str(model), str(work / "out_dft_glibc"),
                      "glibc-default"],
        # the options dft sets through MergeOptions, given as CLI flags
        "cli": [MERGEKIT_YAML_CLI, str(mk_yaml), str(out_cli), "--no-cuda", "--lazy-unpickle", "--low-cpu-memory",
                "--no-write-model-card", "--random-seed", "0", "--quiet",
                "--out-shard-size", str(_largest_shard(str(model), str(other)))],  # as merge_models sets it
    }
    print(f"model: {model} ({len(_weights(model))} shards, largest {max(f.stat().st_size for f in _weights(model)) / 1e6:.0f} MB)"
          f"\nother: {other} ({len(_weights(other))} shards)\nconfig: conf/merge/{args.merge}.yaml -> {mk_yaml}")
    base = run_measured([PY, "-c", IMPORT_CHILD], logs / "imports.log")
    print(f"a process that only imports dft.merging + mergekit: peak RSS {base['peak_rss_mb']:.0f} MB")
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, rounds: 1 warm-up + {args.repeats}")

    sides = ("dft", "cli") + (("dft-glibc",) if args.glibc_default else ())
    runs = {side: [] for side in sides}
    for rnd in range(args.repeats + 1):
        order = sides if rnd % 2 == 0 else sides[::-1]
        for side in order:
            out = {"dft": out_dft, "cli": out_cli}.get(side, work / "out_dft_glibc")
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured(cmds[side], logs / f"{side}_{rnd}.log")
            if side.startswith("dft"):
                line = [ln for ln in r["log"].read_text().splitlines() if ln.startswith("DFT_RESULT ")][-1]
                r.update(json.loads(line[len("DFT_RESULT "):]))
            if rnd > 0:
                runs[side].append(r)
            print(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''} {side}: {r['wall_s']:.2f} s wall, "
                  f"{r['cpu_s']:.2f} s CPU, {r['peak_rss_mb']:.0f} MB", flush=True)

    med = lambda side, key: statistics.median(r[key] for r in runs[side])  # noqa: E731
    eq = compare_outputs(out_dft, out_cli)
    read_b = _nbytes(_weights(model)) + _nbytes(_weights(other))
    write_b = _nbytes(_weights(out_dft))
    tp = throughput(work, min(read_b + write_b, 1 << 29))
    lb_cold = read_b / tp["read_cold_Bps"] + write_b / tp["write_Bps"]
    lb_warm = read_b / tp["read_warm_Bps"] + write_b / tp["write_Bps"]

    d_wall, d_merge, d_imp, c_wall = med("dft", "wall_s"), med("dft", "merge_s"), med("dft", "import_s"), med("cli", "wall_s")
    d_rss, c_rss = med("dft", "peak_rss_mb"), med("cli", "peak_rss_mb")
    d_cpu, c_cpu = med("dft", "cpu_s"), med("cli", "cpu_s")
    load = os.getloadavg()[0]
    mb = 1 / 1e6
    print("\n== results (median of %d) ==" % args.repeats)
    print(f"dft  process wall  {d_wall:7.2f} s  CPU {d_cpu:7.2f} s  peak RSS {d_rss:6.0f} MB"
          f"   (in it: imports {d_imp:.2f} s, merge_models {d_merge:.2f} s wall)")
    print(f"CLI  process wall  {c_wall:7.2f} s  CPU {c_cpu:7.2f} s  peak RSS {c_rss:6.0f} MB")
    if args.glibc_default:
        print(f"dft without its allocator setting: process wall {med('dft-glibc', 'wall_s'):.2f} s, merge_models "
              f"{med('dft-glibc', 'merge_s'):.2f} s, peak RSS {med('dft-glibc', 'peak_rss_mb'):.0f} MB")
    for side in sides:
        print(f"peak RSS per round, {side:9s}: " + ", ".join(f"{r['peak_rss_mb']:.0f}" for r in runs[side])
              + f" MB (max {max(r['peak_rss_mb'] for r in runs[side]):.0f})")
    print(f"load average now {load:.1f} on {os.cpu_count()} CPUs (wall times are unreliable when it exceeds the CPUs)")
    print(f"outputs tensor-equal: {eq}")
    print(f"I/O: read {read_b * mb:.0f} MB + write {write_b * mb:.0f} MB; disk write+fsync {tp['write_Bps'] * mb:.0f} MB/s, "
          f"cold read {tp['read_cold_Bps'] * mb:.0f} MB/s, page-cache read {tp['read_warm_Bps'] * mb:.0f} MB/s")
    print(f"I/O lower bound: {lb_cold:.2f} s (cold read), {lb_warm:.2f} s (inputs in page cache)")
    print("== ratios ==")
    print(f"CLI wall / dft process wall      {c_wall / d_wall:6.2f}x")
    print(f"CLI wall / dft merge_models      {c_wall / d_merge:6.2f}x")
    print(f"CLI CPU / dft process CPU        {c_cpu / d_cpu:6.2f}x")
    print(f"CLI peak RSS / dft peak RSS      {c_rss / d_rss:6.2f}x")
    print(f"dft merge_models / I/O bound     {d_merge / lb_cold:6.2f}x cold, {d_merge / lb_warm:6.2f}x warm")
    print(f"CLI wall / I/O bound             {c_wall / lb_cold:6.2f}x cold, {c_wall / lb_warm:6.2f}x warm")
    one = _nbytes(_weights(model)) * mb
    d_max = max(r["peak_rss_mb"] for r in runs["dft"])
    print(f"peak RSS / one input model       dft {d_rss / one:.2f}x (worst round {d_max / one:.2f}x), CLI {c_rss / one:.2f}x"
          f"   (goal dft <= 1.5x; imports alone {base['peak_rss_mb'] / one:.2f}x)")
    print(f"peak RSS / output size           dft {d_rss / (write_b * mb):.2f}x, CLI {c_rss / (write_b * mb):.2f}x")


if __name__ == "__main__":
    main()
