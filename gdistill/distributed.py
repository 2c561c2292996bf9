"""Multi-process runtime: jax.distributed from explicit flags, from the cluster, or not at all.

gdistill.main calls `initialize(detect(...))` before anything touches devices. Three ways:
  explicit  --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process
            (any launcher: ssh, srun, a container scheduler, or loopback tests);
  cluster   jax.distributed.initialize() with JAX's own detection: SLURM (under srun with
            several tasks), Cloud TPU VMs (the metadata server names the workers), Open MPI;
  single    one process, the default when nothing indicates a cluster.
Every process then runs the same program on the same global mesh: jax.devices() lists all
processes' devices, each process feeds its own rows of the batch, orbax writes checkpoints
collectively, and only process 0 prints and writes dashboards.

On CPU the cross-process collectives are gloo over TCP. A process whose peer dies (no heartbeat
for heartbeat_timeout_s) is terminated by JAX's coordination service: see docs/SCALING.md.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Mapping, Optional

import jax

MODES = ("auto", "cluster", "off")


class LaunchError(ValueError):
  """Inconsistent multi-process flags or environment; the message says what to pass."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the run.

  how: 'single' | 'explicit' | 'cluster'. For 'explicit' the three coordinates are set; for
  'cluster' JAX fills in the ones left None from the environment (SLURM, TPU metadata, MPI).
  why: one line for the console (what was detected).
  """
  how: str
  why: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def _slurm_tasks(env: Mapping[str, str]) -> int:
  """SLURM_NTASKS under an srun step that JAX can read (1 if not under srun)."""
  need = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
          "SLURM_LOCALID")
  if not all(k in env for k in need):
    return 1
  try:
    return int(env["SLURM_NTASKS"])
  except ValueError:
    return 1


def on_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU chips are visible as /dev/accel* (v2-v4) or /dev/vfio/N (v5+)."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise LaunchError(f"--coordinator_address={address!r} is invalid: HOST:PORT of process 0, "
                      "e.g. 10.0.0.1:8476 (the same on every process)")


def detect(*, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
           mode: str = "auto", env: Optional[Mapping[str, str]] = None,
           tpu_vm: Optional[bool] = None) -> Launch:
  """Decides how to start from the flags and the environment (pure: no JAX calls).

  Explicit flags win; then (mode 'auto') an srun step with several tasks or a TPU VM; mode
  'cluster' always asks JAX to detect; mode 'off' is one process whatever the environment.
  """
  if mode not in MODES:
    raise LaunchError(f"--distributed={mode!r} is invalid: one of {MODES}")
  env = os.environ if env is None else env
  given = {"--coordinator_address": bool(coordinator_address),
           "--num_processes": num_processes > 0, "--process_id": process_id >= 0}
  if any(given.values()):
    if mode == "off":
      raise LaunchError("--distributed=off contradicts the explicit multi-process flags "
                        f"{[k for k, v in given.items() if v]}")
    if mode == "auto" and not all(given.values()):
      missing = [k for k, v in given.items() if not v]
      raise LaunchError(f"explicit multi-process launch needs all three flags; missing "
                        f"{missing} (or pass --distributed=cluster to let JAX detect the rest)")
    if coordinator_address:
      _check_address(coordinator_address)
    if num_processes > 0 and process_id >= num_processes:
      raise LaunchError(f"--process_id={process_id} is invalid: 0 <= process_id < "
                        f"--num_processes={num_processes}")
    how = "explicit" if all(given.values()) else "cluster"
    return Launch(how, f"{how}: coordinator {coordinator_address or '(detected)'}",
                  coordinator_address or None, num_processes if num_processes > 0 else None,
                  process_id if process_id >= 0 else None)
  if mode == "off":
    return Launch("single", "one process (--distributed=off)")
  if mode == "cluster":
    return Launch("cluster", "cluster: jax.distributed detects the coordinator and processes")
  tasks = _slurm_tasks(env)
  if tasks > 1:
    return Launch("cluster", f"SLURM job {env['SLURM_JOB_ID']}: {tasks} tasks (srun)")
  if on_tpu_vm() if tpu_vm is None else tpu_vm:
    return Launch("cluster", "Cloud TPU VM: workers from the TPU metadata")
  return Launch("single", "one process")


def initialize(launch: Launch, *, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300, local_device_count: int = 0) -> None:
  """Starts JAX's distributed runtime as `launch` says. Call before any JAX computation.

  local_device_count > 0 sets the number of CPU devices of this process (simulated devices
  for tests and compile checks; accelerators are unaffected).
  """
  if local_device_count > 0:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if launch.how == "single":
    return
  # Cross-process collectives of the CPU backend (the default in recent JAX; explicit here).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
      process_id=launch.process_id, initialization_timeout=int(initialization_timeout_s),
      heartbeat_timeout_seconds=int(heartbeat_timeout_s))


def persistent_cache_safe(launch: Launch) -> bool:
  """False for several processes on CPU: there JAX keys persistent-cache entries by device
  assignment and only process 0 writes them, so process 0 would load its executables in a
  second while the others recompile, and the first collective's gloo rendezvous (30 s) between
  them times out. Touches the backend unless the launch is single-process."""
  if launch.how == "single":
    return True
  return jax.process_count() == 1 or jax.default_backend() != "cpu"


def process_rows(n: int) -> slice:
  """This process's contiguous share of n rows (process i of P: rows [i n / P, (i+1) n / P))."""
  p, i = jax.process_count(), jax.process_index()
  return slice(i * n // p, (i + 1) * n // p)


def allgather_rows(local, n: int):
  """The n rows of which each process holds its process_rows(n) share (numpy, leading axis),
  concatenated in process order on every process. One process: returned as it is."""
  import numpy as np
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  p = jax.process_count()
  m = -(-n // p)
  local = np.asarray(local)
  padded = np.zeros((m,) + local.shape[1:], local.dtype)
  padded[:local.shape[0]] = local
  stacked = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
  return np.concatenate([stacked[i, :(i + 1) * n // p - i * n // p] for i in range(p)])


def sync(name: str) -> None:
  """A barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"gdistill:{name}")


def describe() -> str:
  """'process 0 of 2; 4 devices (2 local, cpu)' -- touches the backend."""
  return (f"process {jax.process_index()} of {jax.process_count()}; {jax.device_count()} "
          f"devices ({jax.local_device_count()} local, {jax.default_backend()})")


class PeerWatchdog:
  """Stops this process with one clear line when a peer process of the run stops.

  JAX's coordination service notices a dead peer too, after heartbeat_timeout_s, but it then
  aborts every survivor with a fatal log and thread dumps (its callback cannot reach Python).
  The watchdog notices first: each process bumps a counter in the coordination service's
  key-value store every `period` seconds, and a peer whose counter has not moved for
  stale_fraction x heartbeat_timeout_s (by this process's clock; clocks are never compared
  across hosts) counts as stopped. A process that leaves cleanly (finished, preempted) marks
  itself 'exited' and is no longer watched; a process that fails just stops bumping, so its
  peers stop too instead of waiting in a collective. Losing the coordinator (process 0's key-value
  store) is reported the same way. One key-value read per period fetches every peer.
  """

  PREFIX = "gdistill/alive/"

  def __init__(self, heartbeat_timeout_s: float, *, workdir: str = "",
               stale_fraction: float = 0.6, period: Optional[float] = None):
    self._stale = float(heartbeat_timeout_s) * stale_fraction
    self._period = period or max(0.2, min(2.0, self._stale / 10))
    self._timeout = heartbeat_timeout_s
    self._workdir = workdir
    self._stop = None
    self._thread = None
    self.polls = 0          # completed checks (tests wait on this, not on wall time)
    self.last_seen: dict[int, str] = {}  # peer -> its last value ('exited' once it left)

  def start(self) -> "PeerWatchdog":
    import threading
    from jax._src import distributed as jax_distributed  # the client of jax.distributed
    self._client = jax_distributed.global_state.client
    if self._client is None or jax.process_count() < 2:
      return self
    self._me, self._n = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="gdistill-peer-watchdog",
                                    daemon=True)
    self._thread.start()
    return self

  def stop(self, clean: bool) -> None:
    """clean: this process leaves on purpose (its peers stop watching it)."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=10)
    self._thread = None
    if clean:
      try:
        self._client.key_value_set(f"{self.PREFIX}{self._me}", "exited", allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  (the coordinator may be gone already)
        pass

  def _fail(self, what: str) -> None:
    from gdistill import console
    where = f" under {self._workdir}" if self._workdir else ""
    console.error(f"process {self._me} of {self._n}: {what}. Stopping this process too. "
                  f"Committed checkpoints{where} are intact: once every process can run "
                  "again, rerun the same command on all of them to resume from the last "
                  "committed step.")
    os._exit(1)  # pylint: disable=protected-access  (other threads may sit in a collective)

  def _run(self) -> None:
    import time
    count = 0
    seen: dict[int, tuple[str, float]] = {}  # process -> (last value, local time it changed)
    while not self._stop.is_set():
      count += 1
      now = time.monotonic()
      try:
        self._client.key_value_set(f"{self.PREFIX}{self._me}", str(count),
                                   allow_overwrite=True)
        entries = self._client.key_value_dir_get(self.PREFIX)
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        self._fail(f"lost the coordinator (process 0's coordination service): "
                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return
      for key, value in entries:
        pid = int(key.rsplit("/", 1)[-1])
        if pid == self._me:
          continue
        last = seen.get(pid)
        if last is None or last[0] != value:
          seen[pid] = (value, now)
      self.last_seen = {p: v for p, (v, _) in seen.items()}
      self.polls += 1
      stopped = sorted(p for p, (v, t) in seen.items()
                       if v != "exited" and now - t > self._stale)
      if stopped:
        names = ", ".join(str(p) for p in stopped)
        self._fail(f"process {names} stopped responding ({self._stale:.0f} s without a "
                   f"heartbeat; --heartbeat_timeout_s={self._timeout:g}): it died, was killed "
                   "or hangs (see its log)")
        return
      self._stop.wait(self._period)
