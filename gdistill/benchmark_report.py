"""The benchmark's report: benchmark.json and the markdown table benchmark.md (see
gdistill/benchmark.py for what is measured)."""
from __future__ import annotations

import json

from gdistill import paths
from gdistill.benchmark_loader import loader_markdown

__all__ = ["markdown", "write"]


def markdown(result: dict) -> str:
  head = ("| step | batch | compile s | median ms | img/s/device | GFLOP/img (analytic) | "
          "XLA dot+conv / analytic | XLA all ops / analytic | TFLOP/s/device | MFU | "
          "peak mem MiB |\n|" + "---|" * 11)
  lines = [head] if result["rows"] else []
  for r in result["rows"]:
    lines.append(
        f"| {r['name']} | {r['batch']} | {r['compile_s']:.1f}{' (cached)' * r['compile_cache_hit']}"
        f" | {r['median_s'] * 1e3:.1f} | "
        f"{r['images_per_s_per_device']:.1f} | {r['flops_per_image'] / 1e9:.4g}"
        f"{' (XLA)' * (r.get('flops_source') == 'xla')} | "
        f"{r['xla_matmul_over_analytic']:.3f} | {r['xla_total_over_analytic']:.3f} | "
        f"{r['flops_per_s_per_device'] / 1e12:.4g} | {100 * r['mfu']:.1f}% | "
        f"{r['peak_memory_bytes'] / 2 ** 20:.1f} |")
  lines.append("")
  if any(r.get("flops_source") == "xla" for r in result["rows"]):
    lines.append(f"GFLOP/img (XLA): model.name={result['config_model']['name']!r} has no "
                 "analytic count (gdistill/flops.py); XLA's count of the compiled dots and "
                 "convolutions stands in (ratio 1 by construction).")
  lines.append(f"{result['devices']} x {result['device_kind']}, compute dtype {result['dtype']}; "
               f"peak {result['peak_flops_per_device'] / 1e12:.3f} TFLOP/s per device "
               f"({result['peak_source']}).")
  if "xla_cpu_flags" in result:
    lines.append(f"gdistill's XLA CPU flags (gdistill/runtime.py): {result['xla_cpu_flags']}; "
                 f"XLA_FLAGS={result.get('xla_flags', '')!r}.")
  for k, v in result["step_time_ratios"].items():
    lines.append(f"{k.replace('_', ' ')} (time per image): {v:.2f}x")
  if "reference" in result:
    ref = result["reference"]
    lines.append(f"teacher step vs reference {ref['teacher_img_s']:.0f} img/s: "
                 f"{ref['speedup']:.2f}x")
  if "loader" in result:
    lines += ["", loader_markdown(result["loader"]), ""]
  lines.append(f"total benchmark time {result['total_s']:.0f} s; host load average (1 min) "
               f"{result['load_average_1m'][0]:.1f} before, {result['load_average_1m'][1]:.1f} "
               f"after, on {result['host_cpus']} CPUs")
  return "\n".join(lines)


def write(result: dict, out: str) -> str:
  path = paths.join(paths.resolve(out), "benchmark.json")
  paths.write_text_atomic(path, json.dumps(result, indent=2, default=str))
  paths.write_text_atomic(paths.join(paths.resolve(out), "benchmark.md"), markdown(result) + "\n")
  return path
