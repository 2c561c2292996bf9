"""Scale-out: multi-process runs over loopback, FSDP sharding and memory, restore on another
topology, --mode=compile, launch-script dry runs, launch detection."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from gdistill import compile_check, distributed, driver, plan, sharding, train
import procgroup
import util

# A small U-Net so multi-process runs stay short (cf. test_train's FSDP test).
SMALL = {"model.dropout": 0.0, "model.ch": 16, "model.head_dim": 16, "model.num_groups": 4}


# --- launch detection (pure) ------------------------------------------------------------------

def test_launch_detection_from_flags_and_environment():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
  assert distributed.detect(env={}, tpu_vm=False).how == "single"
  assert distributed.detect(env=slurm, tpu_vm=False).how == "cluster"
  assert distributed.detect(env={**slurm, "SLURM_NTASKS": "1"}, tpu_vm=False).how == "single"
  # sbatch's batch shell (no srun step) is not a cluster launch.
  batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.detect(env=batch_shell, tpu_vm=False).how == "single"
  assert distributed.detect(env={}, tpu_vm=True).how == "cluster"
  assert distributed.detect(env=slurm, mode="off", tpu_vm=True).how == "single"
  assert distributed.detect(env={}, mode="cluster", tpu_vm=False).how == "cluster"
  ex = distributed.detect(coordinator_address="10.0.0.1:8476", num_processes=4, process_id=3,
                          env=slurm)
  assert (ex.how, ex.coordinator_address, ex.num_processes, ex.process_id) == (
      "explicit", "10.0.0.1:8476", 4, 3)
  with pytest.raises(distributed.LaunchError, match="missing.*--process_id"):
    distributed.detect(coordinator_address="10.0.0.1:8476", num_processes=4, env={})
  with pytest.raises(distributed.LaunchError, match="HOST:PORT"):
    distributed.detect(coordinator_address="10.0.0.1", num_processes=2, process_id=0, env={})
  with pytest.raises(distributed.LaunchError, match="process_id=2"):
    distributed.detect(coordinator_address="h:1", num_processes=2, process_id=2, env={})


# --- launch scripts (dry runs) ----------------------------------------------------------------

def _script(*args, env=None):
  out = subprocess.run(["bash", *args], cwd=util.ROOT, capture_output=True, text=True,
                       timeout=30, env={**os.environ, **(env or {})})
  return out.returncode, out.stdout, out.stderr


def test_tpu_pod_dry_run_prints_create_copy_install_and_run_on_all_workers():
  rc, out, err = _script("launch/tpu_pod.sh", "--dry-run", "--name=gd", "--zone=us-central2-b",
                         "--accelerator-type=v5litepod-16", "--", "--config=configs/imagenet64.py",
                         "--config.mesh.fsdp=4", "--workdir=/mnt/runs/a b")
  assert rc == 0, err
  lines = [l for l in out.splitlines() if l.startswith("+ ")]
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create gd --zone=us-central2-b "
                             "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite")
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
  assert any("--worker=all" in l and "pip install -q -r requirements.txt" in l for l in lines)
  run = lines[-1]
  assert "tpu-vm ssh gd" in run and "--worker=all" in run
  assert "python3 -m gdistill.main --distributed=cluster --config=configs/imagenet64.py" in run
  assert "--workdir=/mnt/runs/a\\ b" in run  # quoted for the remote shell
  rc, out, _ = _script("launch/tpu_pod.sh", "--dry-run", "--zone=z", "--queued", "--spot",
                       "--", "--config=configs/digits.py", "--workdir=/w")
  assert rc == 0 and "queued-resources create gdistill-qr" in out and "--spot" in out
  assert "queued-resources describe" in out
  rc, _, err = _script("launch/tpu_pod.sh", "--dry-run", "--", "--workdir=/w")
  assert rc == 2 and "--zone" in err


@pytest.mark.parametrize("launch", ["auto", "explicit"])
def test_slurm_dry_run_prints_sbatch_and_srun(launch):
  rc, out, err = _script("launch/slurm_gpu.sh", "--dry-run", "--nodes=3", "--gpus-per-node=4",
                         f"--launch={launch}", "--partition=gpu", "--",
                         "--config=configs/imagenet64.py", "--workdir=/shared/run")
  assert rc == 0, err
  sbatch, srun = [l for l in out.splitlines() if l.startswith("+ ")]
  per_node = 4 if launch == "auto" else 1
  assert sbatch.startswith(f"+ sbatch --nodes=3 --gpus-per-node=4 --ntasks-per-node={per_node}")
  assert "--partition=gpu" in sbatch and "launch/slurm_gpu.sbatch --config=" in sbatch
  assert srun.startswith("+ srun --kill-on-bad-exit=1")
  if launch == "auto":
    assert "python -m gdistill.main --distributed=cluster --config=configs/imagenet64.py" in srun
  else:
    assert "--coordinator_address=" in out and "node001:8476" in out
    assert '--process_id="$SLURM_PROCID"' in out and "--ntasks=3" in srun


# --- FSDP: shardings follow the rules; memory falls ---------------------------------------------

def _expected_spec(boxed_leaf, rules, mesh, shape):
  spec = nn.logical_to_mesh(nn.get_partition_spec(boxed_leaf), tuple(tuple(r) for r in rules))
  return sharding._fit(spec, shape, mesh)


def test_fsdp_shards_every_large_parameter_moment_ema_and_teacher_by_the_rules():
  """Stage one (guided) holds all four kinds: student params, EMA, Adam moments, teacher."""
  import importlib
  c = importlib.import_module("configs.imagenet64").get_config()
  with c.unlocked():
    c.mesh.data, c.mesh.fsdp = 2, 4
  mesh = sharding.make_mesh(c.mesh)
  stage = {s.kind: s for s in compile_check.stages_to_check(c)}["guided"]
  s = compile_check.abstract_setup(c, stage, mesh)
  boxed = s.student.init_abstract(train.example_shape(c))
  params, ema = s.abstract_state["params"], s.abstract_state["ema"]
  adam = s.abstract_state["opt_state"][1][0]
  threshold = 1 << 16
  big = 0
  for (path, p), b, e, mu, nu in zip(
      jax.tree_util.tree_leaves_with_path(params),
      jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
      jax.tree.leaves(ema), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
    if np.prod(p.shape) < threshold:
      continue
    big += 1
    want = _expected_spec(b, c.logical_axis_rules, mesh, p.shape)
    name = jax.tree_util.keystr(path)
    assert "fsdp" in str(want), name  # every large parameter has an 'mlp' dim that 4 divides
    for x in (p, e, mu, nu):
      assert x.sharding.spec == want, name
      shard = x.sharding.shard_shape(x.shape)
      assert np.prod(shard) * 4 == np.prod(x.shape), (name, shard)
  assert big > 100
  t_boxed = s.teacher.init_abstract(train.example_shape(c))
  for t, b in zip(jax.tree.leaves(s.teacher_params),
                  jax.tree.leaves(t_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))):
    if np.prod(t.shape) >= threshold:
      assert t.sharding.spec == _expected_spec(b, c.logical_axis_rules, mesh, t.shape)
  # float32 parameters: 4 bytes each; a device holds about a quarter.
  total = sum(np.prod(t.shape) * 4 for t in jax.tree.leaves(s.teacher_params))
  per_device = compile_check.per_device_bytes(s.teacher_params)
  assert per_device < 0.26 * total, (per_device, total)


def test_fsdp_lowers_per_device_memory_against_pure_data_parallel():
  """XLA's memory analysis of the compiled teacher step, data 8 x fsdp 1 vs data 2 x fsdp 4.

  configs/toy2d.py (MLP denoiser): its step compiles in ~10 s, the U-Net's in ~75 s on CPU.
  """
  import importlib
  reports = {}
  for fsdp in (1, 4):
    c = importlib.import_module("configs.toy2d").get_config("test")
    with c.unlocked():
      c.mesh.data, c.mesh.fsdp, c.stage = 8 // fsdp, fsdp, "teacher"
    mesh = sharding.make_mesh(c.mesh)
    with jax.set_mesh(mesh):
      reports[fsdp] = compile_check.compile_stage(c, plan.make_plan(c)[0], mesh)
    print(compile_check.format_report(reports[fsdp]))
  dp, fs = reports[1], reports[4]
  # The state (params, EMA, Adam mu and nu) is split four ways but for the small replicated
  # leaves (norms, biases, the 2-feature output layer).
  assert fs["state_bytes_per_device"] < 0.3 * dp["state_bytes_per_device"]
  m1, m4 = dp["memory"], fs["memory"]
  assert m4["argument_size_in_bytes"] < 0.3 * m1["argument_size_in_bytes"]
  assert m4["output_size_in_bytes"] < 0.3 * m1["output_size_in_bytes"]
  assert m4["total_bytes"] < 0.7 * m1["total_bytes"]


# --- restore on another topology ----------------------------------------------------------------

@pytest.mark.slow
def test_run_saved_on_eight_devices_continues_on_two_with_the_same_loss(tmp_path):
  over = {**SMALL, "stage": "teacher", "teacher.num_steps": 6, "checkpoint.every_steps": 3,
          "checkpoint.keep": 5, "checkpoint.async_save": False, "log.every_steps": 1,
          "data.data_dir": str(tmp_path / "tfds")}
  ref = str(tmp_path / "ref8")
  driver.train_and_evaluate(util.quick_config(**over), ref, devices=jax.devices()[:8])
  ref_rows = [json.loads(l) for l in open(os.path.join(ref, "teacher", "metrics.jsonl"))]
  # A run stopped at step 3 on 8 devices: the reference run's committed step-3 checkpoint.
  wd = str(tmp_path / "cont2")
  os.makedirs(os.path.join(wd, "teacher", "checkpoints"))
  shutil.copytree(os.path.join(ref, "teacher", "checkpoints", "3"),
                  os.path.join(wd, "teacher", "checkpoints", "3"))
  driver.train_and_evaluate(util.quick_config(**over), wd, devices=jax.devices()[:2])
  rows = [json.loads(l) for l in open(os.path.join(wd, "teacher", "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [4, 5, 6]
  want = {r["step"]: r["loss"] for r in ref_rows}
  np.testing.assert_allclose([r["loss"] for r in rows], [want[s] for s in (4, 5, 6)],
                             rtol=1e-4)
  a, _ = util.load_export(os.path.join(ref, "teacher", "export"))
  b, _ = util.load_export(os.path.join(wd, "teacher", "export"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


# --- --mode=compile -----------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_mode_prints_per_stage_memory_without_materializing(tmp_path):
  wd = str(tmp_path / "wd")
  t0 = time.time()
  out = subprocess.run(
      procgroup.cmd(wd, {"mesh.data": 2, "mesh.fsdp": 4, "data.data_dir": str(tmp_path / "none"),
                         "compile.device_memory_gib": 0.01}, ["--mode=compile"]),
      cwd=util.ROOT, env=procgroup.env(8), capture_output=True, text=True, timeout=600)
  print(out.stdout, out.stderr[-3000:], f"{time.time() - t0:.1f} s", sep="\n")
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("teacher", "guided", "progressive_4"):
    assert f"[{name}] mesh {{'data': 2, 'fsdp': 4}}" in out.stdout
  assert out.stdout.count("XLA memory analysis per device:") == 3
  assert out.stdout.count("    total ") == 3
  assert out.stdout.count("  proposal for 0.01 GiB per device: ") == 3
  reports = json.load(open(os.path.join(wd, "compile_report.json")))
  assert [r["kind"] for r in reports] == ["teacher", "guided", "progressive"]
  assert all(r["memory"]["total_bytes"] > r["state_bytes_per_device"] > 0 for r in reports)
  assert reports[0]["teacher_bytes_per_device"] == 0 < reports[1]["teacher_bytes_per_device"]
  # Nothing was trained, exported or read: no dataset, no stage folders.
  # (logs/: the run's own log file, where third-party output goes.)
  assert sorted(os.listdir(wd)) == ["compile_report.json", "logs"]
  assert not os.path.exists(tmp_path / "none")


# --- several processes over loopback ------------------------------------------------------------

MP = {**SMALL, "teacher.num_steps": 6, "guided.num_steps": 2, "progressive.num_steps": 2,
      "progressive.start_steps": 2, "eval.enabled": False, "checkpoint.every_steps": 2,
      "log.every_steps": 2}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_process_on_four_devices(tmp_path):
  """2 processes x 2 devices against 1 process x 4 devices, parameter by parameter.

  Both runs use the same cross-device collectives (gloo; the one-process run joins
  jax.distributed with --num_processes=1). XLA's in-process all-reduce, the default for one
  process, sums the devices' gradients in another order than gloo; Adam then turns that
  round-off into parameter differences of up to ~3e-4 of a small leaf's norm within a few steps
  (measured: whole-vector 4e-7 to 1.1e-6). With the same collectives, any difference left comes
  from gdistill: each process's rows of the batch, random numbers, sharding or checkpoints.
  """
  over = {**MP, "data.data_dir": str(tmp_path / "tfds")}
  one = str(tmp_path / "one")
  os.makedirs(tmp_path / "log1")
  procs = procgroup.start_group(one, over, n=1, devices=4, logdir=str(tmp_path / "log1"))
  rcs, outs = procgroup.wait_group(procs, str(tmp_path / "log1"))
  assert rcs == [0], outs[0][-3000:]
  assert "process 0 of 1; 4 devices (4 local, cpu)" in outs[0]
  two = str(tmp_path / "two")
  procs = procgroup.start_group(two, over, n=2, devices=2, logdir=str(tmp_path))
  rcs, outs = procgroup.wait_group(procs, str(tmp_path))
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert "distributed (explicit: coordinator 127.0.0.1:" in outs[0]
  assert "process 0 of 2; 4 devices (2 local, cpu)" in outs[0]
  assert "[teacher]" not in outs[1]  # only process 0 prints
  for name in ("teacher", "guided", "progressive_1"):
    la, lb = ([json.loads(l)["loss"] for l in open(os.path.join(w, name, "metrics.jsonl"))]
              for w in (one, two))
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    a, _ = util.load_export(os.path.join(one, name, "export"))
    b, _ = util.load_export(os.path.join(two, name, "export"))
    worst, equal, total = 0.0, 0, 0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      equal, total = equal + int(np.sum(x == y)), total + x.size
      # Element by element, relative to the element (zeros must match exactly).
      rel = np.abs(x - y) / np.maximum(np.abs(x), np.finfo(np.float32).tiny)
      worst = max(worst, float(rel.max()))
      np.testing.assert_allclose(y, x, rtol=1e-6, atol=0,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)}")
    print(f"{name}: {equal} of {total} parameters bit-identical; worst element relative "
          f"difference {worst:.2e}")


def _wait_for_line(procs, log, line):
  """Waits until `line` is in the log (True) or a process of the group exits first (False).
  Bounded by the run's own progress; the hour is only a guard against a hung test."""
  deadline = time.time() + 3600
  while time.time() < deadline:
    if line in procgroup.read(log):
      return True
    if any(p.poll() is not None for p, _ in procs):
      return line in procgroup.read(log)
    time.sleep(0.05)
  return False


# A stage that cannot end before the signal or kill a test sends: it stops only by that event.
# With the constant schedule num_steps does not enter the update, so the rerun may shorten the
# stage (lineage.resume_record) and finish right after the resume.
ENDLESS = {"teacher.num_steps": 10 ** 6, "teacher.schedule": "constant"}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_both_resume(tmp_path):
  over = {**SMALL, **ENDLESS, "stage": "teacher", "checkpoint.every_steps": 2,
          "checkpoint.async_save": False, "log.every_steps": 2,
          "data.data_dir": str(tmp_path / "tfds")}
  wd = str(tmp_path / "wd")
  heartbeat = 10
  procs = procgroup.start_group(wd, over, n=2, devices=2, logdir=str(tmp_path), heartbeat=heartbeat)
  log0 = os.path.join(str(tmp_path), "proc0.log")
  assert _wait_for_line(procs, log0, "[teacher] step 4/"), procgroup.read(log0)[-3000:]
  procs[1][0].send_signal(signal.SIGKILL)
  t_kill = time.time()
  rc0 = procs[0][0].wait(timeout=3600)
  t_exit = time.time() - t_kill
  _, outs = procgroup.wait_group(procs, str(tmp_path))
  print(f"survivor exited {t_exit:.1f} s after the kill with rc {rc0}")
  # gdistill's peer watchdog stops the survivor before JAX's coordination service would abort
  # it (at heartbeat_timeout_s, with a fatal log and thread dumps: rc -6), with one line naming
  # the dead process and the fix.
  assert rc0 == 1, outs[0][-3000:]
  assert re.search(r"error: process 0 of 2: process 1 stopped responding \(6 s without a "
                   r"heartbeat; --heartbeat_timeout_s=10\).*rerun the same command on all of "
                   r"them to resume", outs[0]), outs[0][-3000:]
  assert "Terminating process because the JAX distributed service" not in outs[0]
  steps = sorted(int(d) for d in os.listdir(os.path.join(wd, "teacher", "checkpoints"))
                 if d.isdigit())
  assert steps and steps[-1] >= 2
  # Rerunning both resumes from the last committed checkpoint and finishes.
  over["teacher.num_steps"] = steps[-1] + 2
  procs = procgroup.start_group(wd, over, n=2, devices=2, logdir=str(tmp_path))
  rcs, outs = procgroup.wait_group(procs, str(tmp_path))
  assert rcs == [0, 0], outs[0][-3000:]
  assert f"[teacher] resuming at step {steps[-1]}" in outs[0]
  assert train.is_finished(wd, "teacher")


# toy2d's MLP compiles in seconds (in the default run); the digits U-Net is the slow variant.
SIGTERM_CASES = {
    "toy2d": ("configs/toy2d.py:test", {}),
    "digits": ("configs/digits.py:quick", SMALL),
}


@pytest.mark.reliability
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [
    "toy2d", pytest.param("digits", marks=pytest.mark.slow)])
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_both_resume(tmp_path, case):
  """Preemption with several processes: SIGTERM reaches process 1 only (JAX's notifier there
  tells the coordination service); both processes agree on one step through the preemption
  sync point, checkpoint it collectively and exit 0; rerunning both resumes at that step.

  The first run is ENDLESS, so however fast the machine, it is still training when the signal
  is handled: it can only stop by the preemption. The rerun shortens it to finish."""
  config, size = SIGTERM_CASES[case]
  over = {**size, **ENDLESS, "stage": "teacher", "checkpoint.every_steps": 10 ** 7,
          "log.every_steps": 1, "log.tensorboard": False,
          "data.data_dir": str(tmp_path / "tfds")}
  wd = str(tmp_path / "wd")
  group = dict(n=2, devices=1, logdir=str(tmp_path), config=config)
  procs = procgroup.start_group(wd, over, **group)
  log0 = os.path.join(str(tmp_path), "proc0.log")
  assert _wait_for_line(procs, log0, "[teacher] step 4/"), procgroup.read(log0)[-3000:]
  procs[1][0].send_signal(signal.SIGTERM)
  rcs, outs = procgroup.wait_group(procs, str(tmp_path), timeout=3600)
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  # Each process reports the step it stopped at: the same one, checkpointed.
  stops = [re.findall(r"\[teacher\] preempted at step (\d+)", o) for o in outs]
  print("stops:", stops)
  assert all(len(s) == 1 for s in stops), outs
  step = int(stops[0][0])
  assert stops[1] == stops[0] and step >= 4
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(wd, "teacher", "checkpoints"))
                 if d.isdigit())
  assert ckpts == [step], ckpts  # every_steps=10**7: only the preemption save
  assert not train.is_finished(wd, "teacher")
  total = step + 3
  procs = procgroup.start_group(wd, {**over, "teacher.num_steps": total}, **group)
  rcs, outs = procgroup.wait_group(procs, str(tmp_path))
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert f"[teacher] resuming at step {step}" in outs[0]
  rows = [json.loads(l) for l in open(os.path.join(wd, "teacher", "metrics.jsonl"))]
  assert rows[-1]["step"] == total
  assert train.is_finished(wd, "teacher")


_WATCHDOG_PROC = r"""
import os, sys, time
from gdistill import distributed
pid, port, role = int(sys.argv[1]), sys.argv[2], sys.argv[3]
distributed.initialize(distributed.detect(coordinator_address=f"127.0.0.1:{port}",
                                          num_processes=2, process_id=pid),
                       heartbeat_timeout_s=30, initialization_timeout_s=60)
dog = distributed.PeerWatchdog(3, workdir="/runs/x").start()
print("up", flush=True)
guard = time.time() + 600  # only against a hung test; every wait below is on the watchdog
while dog.polls < 3 and time.time() < guard:   # this process is registered with its peer
  time.sleep(0.01)
if pid == 1:
  if role == "die":
    os._exit(9)             # no clean mark: the peer must notice
  dog.stop(clean=True)      # leaves on purpose: the peer must not complain
  print("left cleanly", flush=True)
  sys.exit(0)
if role == "die":           # only the watchdog can end this process
  while time.time() < guard:
    time.sleep(0.05)
  print("peer 0 still running: the watchdog never fired", flush=True)
  sys.exit(0)
while dog.last_seen.get(1) != "exited" and time.time() < guard:
  time.sleep(0.01)
# Past the point where a peer that stopped without the mark would be flagged, twice over: on
# a slow machine this takes more polls, never a different outcome.
t0, p0 = time.monotonic(), dog.polls
while (time.monotonic() - t0 < 2 * 3 * 0.6 or dog.polls < p0 + 3) and time.time() < guard:
  time.sleep(0.05)
print(f"peer 0 still running {dog.polls - p0} polls after its peer left", flush=True)
dog.stop(clean=True)
"""


@pytest.mark.multiprocess
@pytest.mark.reliability
@pytest.mark.parametrize("role", ["die", "leave"])
def test_peer_watchdog_names_a_dead_peer_and_ignores_one_that_left(tmp_path, role):
  """Two bare processes over loopback (no training): the watchdog alone, in seconds."""
  port = procgroup.free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _WATCHDOG_PROC, str(i), str(port), role],
                            cwd=util.ROOT, env=procgroup.env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  rcs = [p.returncode for p in procs]
  print(rcs, outs)
  if role == "die":
    assert rcs[0] == 1, outs[0]
    assert ("error: process 0 of 2: process 1 stopped responding (2 s without a heartbeat; "
            "--heartbeat_timeout_s=3)") in outs[0]
    assert "Committed checkpoints under /runs/x are intact" in outs[0]
    assert "still running" not in outs[0]
  else:
    assert rcs == [0, 0], outs
    assert "peer 0 still running" in outs[0] and "error" not in outs[0]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluate_and_sample_with_two_processes_match_one_process(tmp_path):
  """--mode=evaluate and --mode=sample over 2 processes x 2 devices: the batches are split
  over all four devices (each process samples only its rows), the classifier features of each
  process's share of the samples are gathered, process 0 writes; results and samples equal
  those of 1 process x 4 devices."""
  wd = str(tmp_path / "wd")
  util.write_untrained_workdir(util.tiny_eval_config(), wd)
  results = {}
  for n, devices in ((1, 4), (2, 2)):
    out = str(tmp_path / f"samples_{n}.npz")
    over = {**util.TINY_EVAL_CLI, "sample.stage": "progressive_2", "sample.w": 2.0,
            "sample.out": out}
    for mode in ("sample", "evaluate"):
      logdir = tmp_path / f"log_{mode}_{n}"
      logdir.mkdir()
      if n == 1:  # a fresh classifier and fresh results for each setting
        shutil.rmtree(os.path.join(wd, "eval"), ignore_errors=True)
      procs = procgroup.start_group(wd, over, n=n, devices=devices, logdir=str(logdir),
                           extra=[f"--mode={mode}"])
      rcs, outs = procgroup.wait_group(procs, str(logdir))
      assert rcs == [0] * n, "\n".join(o[-3000:] for o in outs)
      assert all("error" not in o for o in outs), outs
    with np.load(out, allow_pickle=False) as f:
      images = f["images"]
    results[n] = (images, json.load(open(os.path.join(wd, "eval", "results.json")))["rows"])
    if n == 2:
      assert "[evaluate]" in outs[0] and "[evaluate]" not in outs[1]  # process 0 reports
    shutil.move(os.path.join(wd, "eval"), str(tmp_path / f"eval_{n}"))
  np.testing.assert_array_equal(results[2][0], results[1][0])
  one, two = results[1][1], results[2][1]
  assert [(r["stage"], r["sampler"], r["steps"], r["w"]) for r in one] == [
      (r["stage"], r["sampler"], r["steps"], r["w"]) for r in two]
  for a, b in zip(one, two):
    for k in ("fid", "is", "accuracy"):
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a, b)


def test_compile_report_proposes_fsdp_and_accumulation_for_a_device_memory():
  """propose() on the measured ImageNet-64 teacher report (batch 2048 on data 2 x fsdp 4:
  temporaries 355.7 GiB, total 356.8 GiB per device; docs/SCALING.md): 95 GiB devices get
  grad_accum 8 (estimated 45.6 GiB; compiling with it measured 42.6), 16 GiB devices 32, and
  1 GiB devices are told it does not fit, with fsdp grown to all 8 devices."""
  from gdistill import compile_check
  gib = 2 ** 30
  r = {"stage": "teacher", "section": "teacher", "mesh": {"data": 2, "fsdp": 4},
       "batch_size": 2048, "grad_accum": 1,
       "memory": {"temp_size_in_bytes": int(355.717 * gib), "total_bytes": int(356.834 * gib)}}
  p = compile_check.propose(r, 95 * gib)
  assert (p["fsdp"], p["grad_accum"], p["fits"]) == (4, 8, True)
  assert 42 * gib < p["estimated_bytes"] < 0.9 * 95 * gib
  assert "--config.mesh.fsdp=4 --config.teacher.grad_accum=8: about 45.6 GiB" in (
      compile_check.format_proposal(r, p))
  assert compile_check.propose(r, 16 * gib)["grad_accum"] == 32
  tiny = compile_check.propose(r, 1 * gib)
  assert (tiny["fsdp"], tiny["grad_accum"], tiny["fits"]) == (8, 256, False)
  assert "does not fit" in compile_check.format_proposal(r, tiny)
  # A report made with accumulation already: the same proposal (per-example temporaries).
  r8 = dict(r, grad_accum=8, memory={"temp_size_in_bytes": int(355.717 / 8 * gib),
                                     "total_bytes": int((355.717 / 8 + 1.117) * gib)})
  assert compile_check.propose(r8, 95 * gib)["grad_accum"] == 8
  assert compile_check.propose(dict(r, memory=None), 95 * gib) is None


def test_compile_topology_refuses_unknown_slices_and_names_the_missing_compiler(monkeypatch):
  with pytest.raises(ValueError, match="not a TPU slice.*v5p:2x4x4"):
    compile_check.tpu_topology("h100-8")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
  with pytest.raises(RuntimeError, match=r"libtpu.*not installed: pip install 'jax\[tpu\]'"):
    compile_check.tpu_topology("v5p-64")


def _has_libtpu() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]'); not in "
                    "requirements-test.txt: a TPU compiler of 137 MB")
def test_compile_for_a_tpu_slice_without_a_tpu(tmp_path):
  """--config.compile.topology=v5p-8: libtpu compiles the train steps for a v5p-8's 4 chips
  from this CPU host (abstract devices) and reports TPU memory and FLOPs."""
  wd = str(tmp_path / "wd")
  out = subprocess.run(
      procgroup.cmd(wd, {"mesh.fsdp": 2, "data.data_dir": str(tmp_path / "none"),
                         "compile.topology": "v5p-8", "stage": "guided"}, ["--mode=compile"]),
      cwd=util.ROOT, env={**procgroup.env(1), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
      capture_output=True, text=True, timeout=900)
  print(out.stdout, out.stderr[-3000:], sep="\n")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[compile] 4 tpu devices (TPU v5), mesh {'data': 2, 'fsdp': 2}" in out.stdout
  reports = json.load(open(os.path.join(wd, "compile_report.json")))
  assert [r["kind"] for r in reports] == ["guided"]
  assert reports[0]["memory"]["total_bytes"] > reports[0]["state_bytes_per_device"] > 0
  assert reports[0]["flops_per_device"] > 0
