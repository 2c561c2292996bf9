"""Shared helpers for the tests: configs, subprocess runs, export comparison."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_config(**overrides):
  """configs/digits.py:quick with dotted-key overrides (e.g. {'teacher.num_steps': 30})."""
  sys.path.insert(0, ROOT)
  from configs import digits
  c = digits.get_config("quick")
  apply_overrides(c, overrides)
  return c


def apply_overrides(c, overrides):
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    setattr(node, parts[-1], v)
  return c


def cli_args(overrides: dict) -> list[str]:
  out = []
  for k, v in overrides.items():
    if isinstance(v, (tuple, list)):
      v = "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    out.append(f"--config.{k}={v}")
  return out


def run_cli(workdir, overrides, *, config="configs/digits.py:quick", kill_on=None,
            sig=signal.SIGKILL, timeout=600, extra_env=None):
  """Runs gdistill.main in a subprocess; with kill_on (a substring of an output line) it sends
  `sig` as soon as that line appears. Returns (returncode, output, killed)."""
  env = dict(os.environ)
  env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
              "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
              "JAX_PLATFORMS": "cpu"})
  env.update(extra_env or {})
  cmd = [sys.executable, "-m", "gdistill.main", f"--config={os.path.join(ROOT, config)}",
         f"--workdir={workdir}", "--compilation_cache=" + os.environ.get(
             "GDISTILL_TEST_XLA_CACHE", "/tmp/gdistill_test_xla_cache")] + cli_args(overrides)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, killed, t0 = [], False, time.time()
  for line in proc.stdout:
    lines.append(line)
    if kill_on and not killed and kill_on in line:
      proc.send_signal(sig)
      killed = True
    if time.time() - t0 > timeout:
      proc.kill()
      raise TimeoutError("".join(lines[-50:]))
  rc = proc.wait()
  return rc, "".join(lines), killed


def load_export(path):
  from gdistill import checkpoint
  params, meta = checkpoint.load_export_local(path)
  return jax.tree.map(np.asarray, params), meta


def assert_trees_identical(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)
