"""`charlm train` with its defaults against a plain PyTorch LSTM, at equal wall time, in bits per byte.

    python benchmarks/compare_defaults.py --corpus FILE_OR_NAME --minutes 10            # both at once, a core each
    python benchmarks/compare_defaults.py --corpus ptb_char --minutes 10 --sequential   # one after the other

charlm runs `python -m charlm train --corpus C --time-budget M` and nothing else but `--eval-tokens 0`, so
it is scored on the whole validation split as PyTorch is (extra flags only through `--charlm-flag`); PyTorch runs torch_reference.py with the plain recipe: nn.LSTM 2×512, embedding 128,
dropout 0.2, Adam 2e-3 with cosine decay to 0.1× over the budget and no warm-up, T 128, B 32, streams with
the state carried. Both see the same split (a registered corpus's own validation file, else the contiguous
last 10 %) and are scored by charlm's evaluator on all of it, after the budget. By default the two run at
the same time, each pinned to its own CPU with one thread, so both see the same machine load; `--sequential`
runs them one after the other with every core. Validation loss in nats per character becomes bits per UTF-8
byte of the predicted validation text. Prints one JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from charlm.corpus import resolve_corpus
from charlm.kernels.target import cpu_model

HERE = Path(__file__).resolve().parent
TORCH_FLAGS = ("--warmup", "0", "--min-lr-ratio", "0.1", "--eval-every", "0", "--sampling", "streams",
               "--lr", "2e-3")


def bits_per_byte(nats_per_char: float, valid_text: str) -> float:
    """Nats per predicted character -> bits per UTF-8 byte of the predicted text (all but its first character)."""
    predicted = valid_text[1:]
    return nats_per_char * len(predicted) / (math.log(2) * len(predicted.encode("utf-8")))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def launch(command: list[str], log: Path, cpu: int | None) -> subprocess.Popen:
    """Start `command` with stdout+stderr in `log`, pinned to `cpu` when given (the child's thread count
    follows: charlm uses the CPUs it may run on, torch_reference.py is told --threads)."""
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    handle = open(log, "w", encoding="utf-8")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=pin)


def charlm_result(run: Path) -> dict:
    """The last validation in the run's metrics.jsonl, and the last training line's step and time."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in records if r.get("event") == "val"][-1]
    trained = [r for r in records if r.get("event") == "train"]
    return {"step": val["step"], "val": val["loss"], "train_seconds": trained[-1]["elapsed"] if trained else None}


def torch_result(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"the PyTorch run wrote no result; see {log}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="registered corpus name or a text file")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget of each run")
    parser.add_argument("--out", default="compare_defaults", help="folder for the charlm run and both logs")
    parser.add_argument("--sequential", action="store_true",
                        help="run charlm, then PyTorch, each with every core (default: both at once, a core each)")
    parser.add_argument("--cpus", default="0,1", help="the two CPUs of a concurrent run: charlm's, PyTorch's")
    parser.add_argument("--charlm-flag", action="append", default=[], metavar="FLAG",
                        help="an extra `charlm train` flag (repeatable), e.g. --charlm-flag=--seq-len=128")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    valid_text = resolve_corpus(args.corpus).valid.read_text()
    cpus = [None, None] if args.sequential else [int(c) for c in args.cpus.split(",")]
    threads = str(len(os.sched_getaffinity(0)) if args.sequential else 1)
    charlm_cmd = [sys.executable, "-m", "charlm", "train", "--corpus", args.corpus, "--out", str(out / "charlm"),
                  "--time-budget", f"{args.minutes:g}", "--seed", str(args.seed), "--eval-tokens", "0", "--force",
                  *args.charlm_flag]
    torch_cmd = [sys.executable, str(HERE / "torch_reference.py"), "--corpus", args.corpus,
                 "--minutes", f"{args.minutes:g}", "--threads", threads, "--seed", str(args.seed), *TORCH_FLAGS]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.sequential:
        for command, log in ((charlm_cmd, out / "charlm.log"), (torch_cmd, out / "torch.log")):
            if launch(command, log, None).wait():
                raise SystemExit(f"{command[1:5]} failed; see {log}")
    else:
        children = [launch(charlm_cmd, out / "charlm.log", cpus[0]), launch(torch_cmd, out / "torch.log", cpus[1])]
        for child, log in zip(children, (out / "charlm.log", out / "torch.log")):
            if child.wait():
                raise SystemExit(f"a run failed; see {log}")

    common = {"corpus": args.corpus, "minutes": args.minutes, "started": started, "cpu": cpu_model(),
              "commit": commit(), "mode": "sequential" if args.sequential else "concurrent, one core each"}
    rows = []
    for name, result, command in (("charlm", charlm_result(out / "charlm"), charlm_cmd),
                                  ("pytorch", torch_result(out / "torch.log"), torch_cmd)):
        row = {"run": name, **result, "bits_per_byte": bits_per_byte(result["val"], valid_text), **common,
               "command": " ".join(["charlm" if name == "charlm" else "python benchmarks/torch_reference.py",
                                    *command[3 if name == "charlm" else 2:]])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.corpus}, {args.minutes:g} min each ({common['mode']}), {common['cpu']}, commit {common['commit']}")
    print(f"{'run':<8} {'steps':>6} {'val nats/char':>14} {'bits/byte':>10}")
    for row in rows:
        print(f"{row['run']:<8} {row['step']:>6} {row['val']:>14.4f} {row['bits_per_byte']:>10.4f}")


if __name__ == "__main__":
    main()
