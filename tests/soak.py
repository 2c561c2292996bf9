"""Soak: interrupt the digits quick pipeline at random moments, rerun, compare with a clean run.

  python tests/soak.py --workdir=/tmp/soak [--kills=10 --terms=5 --seed=0]
  (or: python -m pytest -m soak)

1. An uninterrupted reference run of `configs/digits.py:quick` (training + evaluation), then
   `--mode=sample` from its final student.
2. The same command in a second workdir, sent SIGKILL at `kills` random moments and SIGTERM at
   `terms` more (in a random order), each after a random delay from the process start; after
   each interruption the same command is simply rerun. Then one rerun to completion and the
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
import tempfile
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


def run(cmd, *, sig=None, delay=None, timeout=1800) -> tuple[int, str]:
  """Runs cmd; with sig, sends it `delay` seconds after the start. Returns (rc, last line)."""
  out = tempfile.NamedTemporaryFile("w+", delete=False, suffix=".log")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
  t0 = time.time()
  sent = False
  while proc.poll() is None:
    if sig is not None and not sent and time.time() - t0 >= delay:
      proc.send_signal(sig)
      sent = True
    if time.time() - t0 > timeout:
      proc.kill()
      raise TimeoutError(" ".join(cmd))
    time.sleep(0.05)
  out.seek(0)
  lines = [l.strip() for l in out.read().splitlines() if l.strip() and "Warning" not in l
           and "OpenCV" not in l]
  out.close()
  os.unlink(out.name)
  return proc.returncode, (lines[-1] if lines else "")[:160]


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
  p.add_argument("--max_delay", type=float, default=45.0,
                 help="delays are uniform in [1, max_delay] seconds after the process start")
  a = p.parse_args(argv)
  os.makedirs(a.workdir, exist_ok=True)
  cache = os.path.join(a.workdir, "xla_cache")
  ref, wd = os.path.join(a.workdir, "ref"), os.path.join(a.workdir, "interrupted")
  sample = ["--mode=sample", "--config.sample.stage=latest", "--config.sample.w=2",
            "--config.sample.num_samples=200", "--config.sample.out=final_samples.npz"]
  t0 = time.time()
  if not os.path.exists(os.path.join(ref, "eval", "results.json")):
    rc, last = run(_cmd(ref, cache))
    assert rc == 0, f"reference run failed ({rc}): {last}"
  rc, last = run(_cmd(ref, cache, *sample))
  assert rc == 0, f"reference sampling failed ({rc}): {last}"
  print(f"reference run + samples: {time.time() - t0:.0f} s", flush=True)
  rnd = random.Random(a.seed)
  plan = [signal.SIGKILL] * a.kills + [signal.SIGTERM] * a.terms
  rnd.shuffle(plan)
  t1 = time.time()
  for i, sig in enumerate(plan):
    delay = rnd.uniform(1.0, a.max_delay)
    rc, last = run(_cmd(wd, cache), sig=sig, delay=delay)
    print(f"{i + 1:2d}/{len(plan)} {signal.Signals(sig).name:7s} at {delay:5.1f} s -> rc {rc:4d}"
          f" | {last}", flush=True)
    if rc not in (0, -signal.SIGKILL, -signal.SIGTERM):
      print(f"unexpected exit code {rc}", flush=True)
      return 1
  rc, last = run(_cmd(wd, cache))
  assert rc == 0, f"final rerun failed ({rc}): {last}"
  rc, last = run(_cmd(wd, cache, *sample))
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
