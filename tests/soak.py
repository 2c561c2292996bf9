"""Soak: interrupt the digits quick pipeline at random moments, rerun, compare with a clean run.

  python tests/soak.py --workdir=/tmp/soak [--kills=10 --terms=5 --seed=0]
  (or: python -m pytest -m soak)

1. An uninterrupted reference run of `configs/digits.py:quick` (training + evaluation), then
   `--mode=sample` from its final student.
2. The same command in a second workdir, sent SIGKILL at `kills` random moments and SIGTERM at
   `terms` more (in a random order): a few during start-up, most a random 0-3 s after a random
   progress line (taken in pipeline order from the reference's metrics), the last ones inside
   the evaluation. After each interruption the same command is simply rerun. Then one rerun to completion and the
   same `--mode=sample`.
3. Checks: every stage's export bit-identical, the evaluation's FID / IS / accuracy identical,
   the final samples bit-identical. Prints one line per interruption (signal, delay, exit code,
   the last line the run printed) and a summary; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("teacher", "guided", "progressive_4", "progressive_2", "progressive_1")


def _cmd(workdir: str, cache: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "gdistill.main", "--config=configs/digits.py:quick",
          f"--workdir={workdir}", f"--compilation_cache={cache}", *extra]


def _env() -> dict:
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")


def _position(line: str, order: list[str]) -> int:
  """Index in `order` (pipeline order) of an output line; -1 for other lines. A stage that
  'finished earlier' counts as its 'done' line."""
  line = line.strip() + " "
  if " finished earlier" in line:
    line = line.split(" finished earlier")[0] + " done"
  for k, prefix in enumerate(order):
    if line.startswith(prefix):
      return k
  return -1


def run(cmd, *, sig=None, when=None, delay=0.0, order=(), timeout=1800):
  """Runs cmd. With sig: sends it `delay` seconds after the first output line at or past
  `when` in `order` (after the process start if `when` is None). Returns (rc, last line,
  sent)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  sent = threading.Event()
  target = order.index(when) if when is not None else None

  def fire():
    if proc.poll() is None:
      proc.send_signal(sig)
      sent.set()

  timer = None
  if sig is not None and when is None:
    timer = threading.Timer(delay, fire)
    timer.start()
  last = ""
  for line in proc.stdout:
    if line.strip() and "Warning" not in line and "OpenCV" not in line:
      last = line.strip()
    if (sig is not None and target is not None and timer is None
        and _position(line, order) >= target):
      timer = threading.Timer(delay, fire)
      timer.start()
    if time.time() - t0 > timeout:
      proc.kill()
      raise TimeoutError(" ".join(cmd))
  rc = proc.wait()
  if timer is not None:
    timer.cancel()
  return rc, last[:160], sent.is_set()


def targets(ref: str) -> list[str]:
  """Output lines of a run, in pipeline order: every logged step of every stage, each stage's
  'done', and the end of training (the evaluation follows it)."""
  out = []
  for st in STAGES:
    with open(os.path.join(ref, st, "metrics.jsonl")) as f:
      rows = [json.loads(l) for l in f]
    total = rows[-1]["step"]
    out += [f"[{st}] step {r['step']}/{total} " for r in rows] + [f"[{st}] done"]
  return out + ["[pipeline] plan ["]


def exports_equal(a: str, b: str) -> list[str]:
  sys.path.insert(0, ROOT)
  from gdistill import checkpoint
  import jax
  diffs = []
  for st in STAGES:
    pa, ma = checkpoint.load_export_local(os.path.join(a, st, "export"))
    pb, mb = checkpoint.load_export_local(os.path.join(b, st, "export"))
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    if len(la) != len(lb) or any(not np.array_equal(np.asarray(x), np.asarray(y))
                                 for x, y in zip(la, lb)):
      diffs.append(f"export {st} differs")
    if ma["train_steps"] != mb["train_steps"]:
      diffs.append(f"export {st}: train_steps {ma['train_steps']} vs {mb['train_steps']}")
  return diffs


def eval_rows(workdir: str) -> list:
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    rows = json.load(f)["rows"]
  return [(r["stage"], r["sampler"], r["steps"], r["w"], r["fid"], r["is"], r["accuracy"])
          for r in rows]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--kills", type=int, default=10)
  p.add_argument("--terms", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  os.makedirs(a.workdir, exist_ok=True)
  cache = os.path.join(a.workdir, "xla_cache")
  ref, wd = os.path.join(a.workdir, "ref"), os.path.join(a.workdir, "interrupted")
  sample = ["--mode=sample", "--config.sample.stage=latest", "--config.sample.w=2",
            "--config.sample.num_samples=200"]
  t0 = time.time()
  if not os.path.exists(os.path.join(ref, "eval", "results.json")):
    rc, last, _ = run(_cmd(ref, cache))
    assert rc == 0, f"reference run failed ({rc}): {last}"
  rc, last, _ = run(_cmd(ref, cache, *sample,
                         f"--config.sample.out={os.path.join(ref, 'final_samples.npz')}"))
  assert rc == 0, f"reference sampling failed ({rc}): {last}"
  print(f"reference run + samples: {time.time() - t0:.0f} s", flush=True)
  rnd = random.Random(a.seed)
  n = a.kills + a.terms
  signals = [signal.SIGKILL] * a.kills + [signal.SIGTERM] * a.terms
  rnd.shuffle(signals)
  # Random moments spread over the whole pipeline: a few during start-up (timed from the
  # process start), the rest after random progress lines in pipeline order (plus a random
  # 0-3 s), the last ones inside the evaluation (after training ends).
  lines = targets(ref)
  n_start = max(1, n // 8)
  n_eval = max(1, n // 8)
  picks = sorted(rnd.sample(range(len(lines) - 1), n - n_start - n_eval))
  moments = ([(None, rnd.uniform(1.0, 15.0)) for _ in range(n_start)]
             + [(lines[i], rnd.uniform(0.0, 3.0)) for i in picks]
             + [("[pipeline] plan [", rnd.uniform(2.0, 20.0)) for _ in range(n_eval)])
  t1 = time.time()
  for i, (sig, (when, delay)) in enumerate(zip(signals, moments)):
    rc, last, sent = run(_cmd(wd, cache), sig=sig, when=when, delay=delay, order=lines)
    where = f"{delay:4.1f} s after {when.strip()!r}" if when else f"{delay:4.1f} s after start"
    print(f"{i + 1:2d}/{n} {signal.Signals(sig).name:7s} {where:48s} -> "
          f"{'sent' if sent else 'not sent (run ended first)'}, rc {rc:3d} | {last}", flush=True)
    if rc not in (0, -signal.SIGKILL, -signal.SIGTERM):
      print(f"unexpected exit code {rc}", flush=True)
      return 1
  rc, last, _ = run(_cmd(wd, cache))
  assert rc == 0, f"final rerun failed ({rc}): {last}"
  rc, last, _ = run(_cmd(wd, cache, *sample,
                         f"--config.sample.out={os.path.join(wd, 'final_samples.npz')}"))
  assert rc == 0, f"final sampling failed ({rc}): {last}"
  print(f"interrupted runs + final rerun + samples: {time.time() - t1:.0f} s", flush=True)
  diffs = exports_equal(ref, wd)
  if eval_rows(ref) != eval_rows(wd):
    diffs.append("evaluation rows differ")
  with np.load(os.path.join(ref, "final_samples.npz"), allow_pickle=False) as x, \
      np.load(os.path.join(wd, "final_samples.npz"), allow_pickle=False) as y:
    if not np.array_equal(x["images"], y["images"]):
      diffs.append("final samples differ")
    n = len(x["images"])
  if diffs:
    print("SOAK FAILED:\n  " + "\n  ".join(diffs), flush=True)
    return 1
  print(f"SOAK PASSED: {a.kills} SIGKILL + {a.terms} SIGTERM; {len(STAGES)} exports, "
        f"{len(eval_rows(wd))} evaluation results and {n} final samples bit-identical to the "
        f"uninterrupted run ({(time.time() - t0) / 60:.1f} min)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
