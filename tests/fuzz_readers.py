"""Longer mutation fuzzing of the readers than the suite runs (tests/test_fuzz.py):

    .venv/bin/python tests/fuzz_readers.py --seconds 300 [--kind gguf] [--seed 1]

Random mutations (tests/fuzzing.py) of the seed inputs, read by the real readers; each input
either reads or is refused with an EdgertError. Anything else (another exception, a crash
of the child process) is written to tests/fuzz_corpus/<kind>/ and becomes a regression test.
Prints iterations and outcomes per kind. Cases run in a worker process so that a crash (a
signal) or a hang is seen as one too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import fuzzing  # noqa: E402

VALUES = [0, -1, 1, 2, 3, 7, 16, 1 << 31, 1 << 62, 10**12, 0.5, -0.0, float("nan"),
          float("inf"), "", "64", None, True, False, [], [1, 2], {}, {"rope_type": "linear"},
          {"rope_type": "llama3", "factor": 0}]


def random_mutation(kind: str, rng: random.Random, size: int) -> dict:
    m: dict = {}
    if kind == "gguf" or rng.random() < 0.5:
        limit = min(size, fuzzing.HEADER_BYTES[kind])
        m["flips"] = [[rng.randrange(limit), rng.randrange(256)]
                      for _ in range(rng.randint(1, 8))]
        if rng.random() < 0.1:
            m["truncate"] = rng.randrange(size)
    if kind != "gguf" and (not m or rng.random() < 0.5):
        m["config"] = {rng.choice(fuzzing.CONFIG_KEYS): rng.choice(VALUES)
                       for _ in range(rng.randint(1, 3))}
    return m


def _worker(inbox, outbox) -> None:
    """A spawned process (MLX does not survive fork) that reads cases until told to stop."""
    sys.path.insert(0, str(Path(__file__).parent))
    while (case := inbox.get()) is not None:
        kind, seed, mutation, work = case
        try:
            path = fuzzing.apply(kind, Path(seed), mutation, Path(work))
            outbox.put(fuzzing.outcome(kind, path))
        except BaseException as e:  # noqa: BLE001 - a finding
            outbox.put("finding: " + "".join(
                traceback.format_exception_only(type(e), e)).strip())


class Runner:
    """Runs cases in a worker process; a case that kills or hangs it is a finding, and a new
    worker takes over."""

    def __init__(self, timeout: float = 60.0):
        self.ctx, self.timeout, self.proc = mp.get_context("spawn"), timeout, None

    def _start(self):
        self.inbox, self.outbox = self.ctx.Queue(), self.ctx.Queue()
        self.proc = self.ctx.Process(target=_worker, args=(self.inbox, self.outbox), daemon=True)
        self.proc.start()

    def __call__(self, kind, seed, mutation, work) -> str:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.inbox.put((kind, str(seed), mutation, work))
        try:
            return self.outbox.get(timeout=self.timeout)
        except queue.Empty:
            code = self.proc.exitcode
            self.proc.kill()
            self.proc.join()
            self.proc = None
            return "finding: hang" if code is None else f"finding: worker died ({code})"

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.inbox.put(None)
            self.proc.join(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--kind", choices=fuzzing.KINDS, action="append")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    kinds = args.kind or list(fuzzing.KINDS)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        seeds = fuzzing.make_seeds(Path(tmp) / "seeds")
        size = {k: (p.stat().st_size if p.is_file() else (p / "model.safetensors").stat().st_size)
                for k, p in seeds.items()}
        counts = {k: Counter() for k in kinds}
        run_case = Runner()
        end = time.time() + args.seconds
        i = 0
        while time.time() < end:
            kind = kinds[i % len(kinds)]
            i += 1
            m = random_mutation(kind, rng, size[kind])
            result = run_case(kind, seeds[kind], m, str(Path(tmp) / "work"))
            counts[kind][result.split(":")[0]] += 1
            if result.startswith("finding"):
                path = fuzzing.keep(kind, m, result[:300])
                print(f"{kind}: {result[:200]} -> {path.name}", flush=True)
        run_case.close()
    for kind, c in counts.items():
        print(json.dumps({"kind": kind, "iterations": sum(c.values()), **c}))


if __name__ == "__main__":
    main()
