"""Command line: python -m gdistill.main --config=configs/<name>.py[:variant] --workdir=DIR.

--mode=train (default) runs config.stage; --mode=sample writes config.sample's samples of a
finished stage to an .npz; --mode=evaluate sweeps config.eval over the workdir's exports into
<workdir>/eval/. --config.key=value overrides any config key (the config is locked: a mistyped
key fails).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory: checkpoints, exports, dashboards.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate"], "What to do.")
flags.DEFINE_string("compilation_cache", "~/.cache/gdistill/xla",
                    "Persistent XLA compilation cache directory ('' disables it).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from gdistill import config_lib, preemption, runtime, train
  runtime.enable_compilation_cache(FLAGS.compilation_cache)
  preemption.install()
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      from gdistill import evaluate
      evaluate.sample_to_file(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      from gdistill import evaluate
      evaluate.evaluate_workdir(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    print(str(e), flush=True)
    sys.exit(0)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
