"""Process groups for the multi-process tests: n gdistill.main processes over loopback."""
import os
import socket
import subprocess
import sys
import time

import util
import xla_env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  env = dict(os.environ)
  env.update({"XLA_FLAGS": xla_env.xla_flags(devices),
              "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"})
  return env


def cmd(workdir, overrides, extra=(), config="configs/digits.py:quick") -> list[str]:
  return [sys.executable, "-m", "gdistill.main",
          f"--config={os.path.join(util.ROOT, config)}", f"--workdir={workdir}",
          "--compilation_cache=" + os.environ.get("GDISTILL_TEST_XLA_CACHE",
                                                  "/tmp/gdistill_test_xla_cache"),
          *util.cli_args(overrides), *extra]


def start_group(workdir, overrides, *, n: int, devices: int, logdir, heartbeat: int = 100,
                 port: int = 0, config="configs/digits.py:quick", extra=()):
  """n processes of gdistill.main over loopback, `devices` CPU devices each; logs in logdir."""
  port = port or free_port()
  procs = []
  for i in range(n):
    log = open(os.path.join(logdir, f"proc{i}.log"), "w")
    flags = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
             f"--process_id={i}", f"--heartbeat_timeout_s={heartbeat}",
             "--initialization_timeout_s=60", *extra]
    procs.append((subprocess.Popen(cmd(workdir, overrides, flags, config), cwd=util.ROOT,
                                   env=env(devices), stdout=log, stderr=subprocess.STDOUT),
                  log))
  return procs


def wait_group(procs, logdir, timeout=900):
  t0, rcs = time.time(), []
  for p, log in procs:
    try:
      rcs.append(p.wait(timeout=max(timeout - (time.time() - t0), 1)))
    finally:
      log.close()
  outs = [open(os.path.join(logdir, f"proc{i}.log")).read() for i in range(len(procs))]
  return rcs, outs


def read(path):
  with open(path) as f:
    return f.read()
