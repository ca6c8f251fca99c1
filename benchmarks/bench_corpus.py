"""What a big corpus costs: wall time and peak memory of `charlm train ... --max-steps 3` by corpus size.

Makes corpora of the given sizes from wikitext-2's training text, its lines shuffled anew for every copy
(so no two copies are alike), in a temporary folder that is deleted afterwards, and runs

    python -m charlm train --corpus FILE --tokenizer KIND --max-steps 3 --hidden 256 --embed 64

in a fresh process with an empty cache for each (size, tokenizer), reading the child's own peak RSS
(`os.wait4`) and the encoding rate charlm prints. With --warm, the char run is repeated with its cache
kept: what reusing encoded ids costs (the checksum pass and training).

    python benchmarks/bench_corpus.py                       # 100, 300, 1000 MB x char, word, bpe
    python benchmarks/bench_corpus.py --sizes 100 --tokenizers char --warm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlm.corpus import resolve_corpus
from charlm.kernels.target import cpu_model

ENCODED = re.compile(r"encoded ([\d,.]+) MB into ([\d,]+) \w+ tokens \((\w+)\) in ([\d.]+) s \(([\d,]+) MB/s\)")
MODEL_FLAGS = ["--max-steps", "3", "--hidden", "256", "--embed", "64"]


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """Copies of wikitext-2's training lines, each copy shuffled with its own seed, up to `megabytes`."""
    source = resolve_corpus("wikitext-2").train.read_text().splitlines(keepends=True)
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as out:
        while written < megabytes * 10**6:
            lines = source[:]
            rng.shuffle(lines)
            chunk = "".join(lines).encode("utf-8")
            out.write(chunk)
            written += len(chunk)
    return written


def run_train(corpus: Path, kind: str, work: Path, cache: Path, extra: list[str]) -> dict:
    """One `charlm train` in a child process: wall seconds, the child's peak RSS, what it printed."""
    out = work / f"run-{kind}"
    command = [sys.executable, "-m", "charlm", "train", "--corpus", str(corpus), "--out", str(out), "--force",
               "--tokenizer", kind, *MODEL_FLAGS, *extra]
    env = {**os.environ, "CHARLM_CACHE": str(cache)}
    started = time.monotonic()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{output}")
    shutil.rmtree(out, ignore_errors=True)
    encoded = [match.groups() for match in ENCODED.finditer(output)]
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # Linux: KiB
        "encode_mb_per_s": [int(rate.replace(",", "")) for *_, rate in encoded],
        "id_dtype": encoded[0][2] if encoded else None,
        "output": output.strip().splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,300,1000", help="corpus sizes in MB (10^6 bytes)")
    parser.add_argument("--tokenizers", default="char,word,bpe")
    parser.add_argument("--warm", action="store_true", help="also rerun char with its cache kept")
    parser.add_argument("--workdir", help="where corpora and caches go (default: a temporary folder)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--train-flags", default="", help="more flags for charlm train, e.g. '--eval-tokens 100000'")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    kinds = args.tokenizers.split(",")
    extra = args.train_flags.split()
    work = Path(tempfile.mkdtemp(prefix="charlm-bench-corpus-", dir=args.workdir))
    records = []
    try:
        for megabytes in sizes:
            corpus = work / f"wikitext2-x-{megabytes}MB.txt"
            nbytes = make_corpus(corpus, megabytes)
            started = time.monotonic()
            resolve_corpus(str(corpus))  # the pass every run makes: sha256, NUL bytes, UTF-8
            check_s_per_gb = (time.monotonic() - started) / (nbytes / 1e9)
            print(json.dumps({"corpus_mb": round(nbytes / 1e6), "check_s_per_gb": round(check_s_per_gb, 2)}),
                  flush=True)
            for kind in kinds:
                cache = work / f"cache-{kind}"
                record = {"corpus_mb": round(nbytes / 1e6), "tokenizer": kind, "cache": "cold", "flags": extra,
                          "check_s_per_gb": round(check_s_per_gb, 2),
                          **run_train(corpus, kind, work, cache, extra)}
                records.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "output"}), flush=True)
                if args.warm and kind == "char":
                    record = {"corpus_mb": round(nbytes / 1e6), "tokenizer": kind, "cache": "warm",
                              "check_s_per_gb": round(check_s_per_gb, 2),
                              **run_train(corpus, kind, work, cache, extra)}
                    records.append(record)
                    print(json.dumps({k: v for k, v in record.items() if k != "output"}), flush=True)
                shutil.rmtree(cache, ignore_errors=True)
            corpus.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(records, extra)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "records": records}, indent=2))


def print_table(records: list[dict], extra: list[str]) -> None:
    print(f"\nCPU: {cpu_model()}; {os.cpu_count()} cores; command: charlm train --corpus FILE --tokenizer KIND "
          f"{' '.join(MODEL_FLAGS + extra)}")
    print("| corpus | tokenizer | ids cache | wall time | peak RSS | encoding rate | ids | check pass |")
    print("|---:|---|---|---:|---:|---:|---|---:|")
    for r in records:
        rates = ", ".join(f"{rate} MB/s" for rate in r["encode_mb_per_s"]) or "cached"
        print(f"| {r['corpus_mb']:,} MB | {r['tokenizer']} | {r['cache']} | {r['seconds']:.0f} s | "
              f"{r['peak_rss_mib']:,} MiB | {rates} | {r['id_dtype'] or ''} | {r['check_s_per_gb']:.1f} s/GB |")


if __name__ == "__main__":
    main()
