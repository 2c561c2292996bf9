"""Console progress, TensorBoard (clu metric writers), metrics.jsonl and sample-grid PNGs.

Only process 0 writes files and prints; other processes log nothing.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Optional

import jax
import numpy as np

from gdistill import paths


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*H, cols*W, C] image (1-pixel gaps)."""
  n, h, w, c = images.shape
  cols = int(np.ceil(n / rows))
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for k in range(n):
    r, q = divmod(k, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[k]
  return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  from PIL import Image
  img = image if image.shape[-1] != 1 else image[..., 0]
  im = Image.fromarray(img)
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  paths.write_bytes_atomic(path, buf.getvalue())


def scatter_png(path: str, points: np.ndarray, labels: np.ndarray, title: str = "") -> np.ndarray:
  """Scatter plot of 2-D points coloured by label; returns the RGB image array."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
  ax.scatter(points[:, 0], points[:, 1], c=labels, s=3, cmap="tab10")
  ax.set_xlim(-1.6, 1.6)
  ax.set_ylim(-1.6, 1.6)
  ax.set_title(title, fontsize=8)
  fig.canvas.draw()
  img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  paths.save_figure(fig, path)
  plt.close(fig)
  return img


class Dashboard:
  """Writes scalars to TensorBoard + metrics.jsonl and prints progress lines with ETA."""

  def __init__(self, logdir: str, stage: str, total_steps: int, batch_size: int,
               start_step: int = 0, throughput_fn=None, tensorboard: bool = True):
    """throughput_fn(images_per_sec) -> extra scalars (model TFLOP/s per device, MFU).
    tensorboard=False: console and metrics.jsonl only (TensorFlow is not imported)."""
    self.stage, self.total, self.batch = stage, total_steps, batch_size
    self._throughput_fn = throughput_fn
    self.primary = jax.process_index() == 0
    self._writer = None
    self._jsonl: Optional[str] = None
    if self.primary:
      paths.makedirs(logdir)
      if tensorboard:
        from clu import metric_writers  # imports TensorFlow: only where we write
        self._writer = metric_writers.create_default_writer(
            os.path.join(logdir, "tensorboard"), asynchronous=True, just_logging=False)
      self._jsonl = os.path.join(logdir, "metrics.jsonl")
    self._t0, self._s0 = time.time(), start_step

  def scalars(self, step: int, metrics: dict, *, console: bool = True) -> None:
    now = time.time()
    done = max(step - self._s0, 1)
    rate = done / max(now - self._t0, 1e-9)
    row = {k: float(v) for k, v in metrics.items()}
    row.update(steps_per_sec=rate, images_per_sec=rate * self.batch)
    if self._throughput_fn is not None:
      row.update(self._throughput_fn(rate * self.batch))
    if not self.primary:
      return
    if self._writer is not None:
      self._writer.write_scalars(step, row)
    paths.append_text(self._jsonl, json.dumps({"step": step, **row}) + "\n")
    if console:
      eta = (self.total - step) / max(rate, 1e-9)
      perf = ("steps_per_sec", "images_per_sec", "tflops_per_device", "mfu")
      parts = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in perf)
      mfu = f" MFU {row['mfu']:.1%}" if "mfu" in row else ""
      print(f"[{self.stage}] step {step}/{self.total} {parts} | {rate:.2f} steps/s "
            f"{rate * self.batch:.0f} img/s{mfu} | ETA {eta / 60:.1f} min", flush=True)

  def images(self, step: int, images: dict) -> None:
    if self._writer is not None and images:
      self._writer.write_images(step, images)

  def reset_clock(self, step: int) -> None:
    self._t0, self._s0 = time.time(), step

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
