"""Command line: python -m gdistill.main --config=configs/<name>.py[:variant] --workdir=DIR.

--mode=train (default) runs config.stage; --mode=sample writes config.sample's samples of a
finished stage to an .npz; --mode=evaluate sweeps config.eval over the workdir's exports into
<workdir>/eval/; --mode=compile compiles each stage kind's train step for the configured mesh
on abstract state and prints XLA's per-device memory (nothing is trained or materialized);
--mode=edit / --mode=inpaint edit or inpaint config.edit / config.inpaint's images with a
finished stage (gdistill/edit_modes.py).
--config.key=value overrides any config key (the config is locked: a mistyped key fails).

Several processes (docs/SCALING.md): run the same command on every host with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or under srun / on a Cloud
TPU VM where JAX detects the cluster itself. One process is the default.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory: checkpoints, exports, dashboards.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "compile", "edit", "inpaint"],
                  "What to do.")
flags.DEFINE_string("compilation_cache", "~/.cache/gdistill/xla",
                    "Persistent XLA compilation cache directory ('' disables it).")
flags.DEFINE_enum("distributed", "auto", ["auto", "cluster", "off"],
                  "auto: the explicit flags below, else an srun step with several tasks or a "
                  "Cloud TPU VM, else one process; cluster: always let jax.distributed detect "
                  "the cluster; off: one process.")
flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (explicit multi-process).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (explicit multi-process).")
flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")
flags.DEFINE_integer("local_device_count", 0,
                     "CPU devices of this process (simulated devices; 0: XLA_FLAGS / default).")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "A process that misses heartbeats this long counts as dead; the others "
                     "then stop with an error.")
flags.DEFINE_integer("initialization_timeout_s", 300,
                     "How long to wait for every process to join the coordinator.")
flags.DEFINE_bool("verbose", False,
                  "Print third-party logs (TensorFlow, XLA, orbax, tfds) and tracebacks on the "
                  "terminal too; by default they go to <workdir>/logs/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gdistill import console, paths
  workdir = paths.resolve(FLAGS.workdir)  # relative: the current directory, once, here
  console.capture(workdir, FLAGS.mode, verbose=FLAGS.verbose)
  try:
    _run(workdir)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    console.error("interrupted; committed checkpoints are kept, rerun the same command to "
                  "resume")
    sys.exit(130)
  except BaseException as e:  # pylint: disable=broad-except
    import traceback
    traceback.print_exc()  # to the log (or the terminal with --verbose)
    first = str(e).splitlines()[0] if str(e) else ""
    console.error(f"{type(e).__name__}: {first}{console.traceback_hint()}")
    sys.exit(1)


def _run(workdir: str) -> None:
  from gdistill import console, distributed, runtime
  xla_cpu = runtime.configure_xla_cpu()  # before any backend starts
  logging.info("gdistill XLA CPU flags: %s", xla_cpu)
  try:
    launch = distributed.detect(coordinator_address=FLAGS.coordinator_address,
                                num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                mode=FLAGS.distributed)
  except distributed.LaunchError as e:
    console.error(str(e))
    sys.exit(2)
  distributed.initialize(launch, heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                         initialization_timeout_s=FLAGS.initialization_timeout_s,
                         local_device_count=FLAGS.local_device_count)
  from gdistill import checkpoint, config_lib, driver, lineage, preemption, train
  config = config_lib.resolve_paths(FLAGS.config)
  cache_ok = distributed.persistent_cache_safe(launch)
  if cache_ok:
    runtime.enable_compilation_cache(FLAGS.compilation_cache)
  preemption.install()
  if launch.how != "single":
    import jax
    if jax.process_index() == 0:
      note = "" if cache_ok else " (no persistent compile cache)"
      print(f"[gdistill] distributed ({launch.why}): {distributed.describe()}{note}",
            flush=True)
  watchdog = distributed.PeerWatchdog(FLAGS.heartbeat_timeout_s, workdir=workdir).start()
  clean = False
  try:
    runtime.configure_tensorflow(config.data)  # before TensorFlow's first op
    if FLAGS.mode == "compile":
      from gdistill import compile_check
      compile_check.run(config, workdir)
    elif FLAGS.mode == "train":
      driver.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "sample":
      from gdistill import evaluate
      evaluate.sample_to_file(config, workdir)
    elif FLAGS.mode in ("edit", "inpaint"):
      from gdistill import edit_modes
      (edit_modes.edit_to_file if FLAGS.mode == "edit" else edit_modes.inpaint_to_file)(
          config, workdir)
    elif FLAGS.mode == "evaluate":
      from gdistill import evaluate
      evaluate.evaluate_workdir(config, workdir)
    clean = True
  except preemption.Preempted as e:
    clean = True
    print(str(e), flush=True)
    sys.exit(0)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    console.error(str(e))
    sys.exit(2)
  except (train.NonFiniteError, lineage.LineageError, checkpoint.CheckpointMismatchError,
          checkpoint.NoUsableCheckpointError, checkpoint.DamagedExportError) as e:
    console.error(f"{type(e).__name__}: {e}")
    sys.exit(1)
  finally:
    watchdog.stop(clean)


if __name__ == "__main__":
  app.run(main)
