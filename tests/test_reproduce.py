"""experiments/reproduce.py: every table's --tiny path end to end (slow), and its errors."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce.py")
TABLES = ("hybrid_latency", "hybrid_frames", "mplug", "metalm_vl", "metalm_multitask")
# The rows the tables ask for, in order.
EXPECTED_TASKS = {
    "metalm_vl": ["VQAv2 zero-shot", "OK-VQA zero-shot", "COCO captioning zero-shot",
                  "VQAv2 2-shot", "OK-VQA 2-shot", "COCO captioning 2-shot",
                  "VQAv2 finetuned", "OK-VQA finetuned", "COCO captioning finetuned",
                  "NLVR2 finetuned"],
    "mplug": ["captioning", "captioning", "captioning", "VQA (generation)",
              "VQA (answer ranking)", "image-to-text retrieval", "text-to-image retrieval"],
}


def run(*args, timeout=1800):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def test_list_and_clear_errors(tmp_path):
  out = run("--list")
  assert out.returncode == 0, out.stderr
  for table in TABLES:
    assert table in out.stdout
  out = run("--table=nope", f"--output_dir={tmp_path}")
  assert out.returncode != 0 and "unknown --table='nope'" in out.stderr
  empty = f"--dataset_dir={tmp_path}/empty"
  # Full size without the official datasets: says which, how to prepare them, and --tiny.
  out = run("--table=mplug", f"--output_dir={tmp_path}", empty)
  assert out.returncode != 0 and "--tiny" in out.stderr, out.stderr[-2000:]
  for name in ("coco_karpathy", "vqav2"):
    assert f"prepare_data.py --dataset={name}" in out.stderr
  out = run("--table=metalm_vl", f"--output_dir={tmp_path}", empty)
  assert out.returncode != 0 and "--tiny" in out.stderr, out.stderr[-2000:]
  for name in ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2"):
    assert f"prepare_data.py --dataset={name}" in out.stderr
  assert not list(tmp_path.glob("*/results.json"))  # nothing was run
  out = run("--table=metalm_multitask", f"--output_dir={tmp_path}")
  assert out.returncode != 0 and "--pretrained=" in out.stderr
  assert "squad_v1" in out.stderr and "--tiny" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_tiny_table_end_to_end(table, tmp_path):
  """REPRODUCE_OUTPUT_DIR=dir keeps the tables (docs/reproducing.md shows such a run)."""
  out_dir = pathlib.Path(os.environ.get("REPRODUCE_OUTPUT_DIR") or tmp_path)
  out = run(f"--table={table}", "--tiny", f"--output_dir={out_dir}",
            f"--dataset_dir={tmp_path}/data")
  assert out.returncode == 0, out.stderr[-3000:]
  text = (out_dir / f"{table}_tiny.md").read_text()
  assert text.startswith(f"## {table} (--tiny)")
  assert "| task | metric | paper | ours | config | data | compute |" in text
  rows = json.loads((out_dir / f"{table}_tiny.json").read_text())
  assert rows and all(r["ours"] is not None for r in rows), rows  # every row was measured
  if table in EXPECTED_TASKS:
    assert [r["task"] for r in rows] == EXPECTED_TASKS[table]
