"""XLA flags of the test processes (no imports: conftest reads it before JAX starts).

The tests run tiny models for a few steps, so compiling dominates them: XLA's CPU backend
compiles about twice as fast without its LLVM optimisations, and the programs it makes are
fast enough for a few steps. GDISTILL_TEST_FULL_OPT=1 keeps the optimisations (as a user's run
does; the README tests run the user's environment either way)."""
import os

FAST_COMPILE = ("" if os.environ.get("GDISTILL_TEST_FULL_OPT") == "1" else
                " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices}" + FAST_COMPILE
