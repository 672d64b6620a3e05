"""experiments/reproduce.py: every table's --tiny path end to end (slow), and its errors."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce.py")
TABLES = ("hybrid_latency", "hybrid_frames", "mplug", "metalm_vl", "metalm_multitask")


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
  out = run("--table=mplug", f"--output_dir={tmp_path}")  # full size: says what is missing
  assert out.returncode != 0 and "VQAv2" in out.stderr and "--tiny" in out.stderr
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
  assert (out_dir / f"{table}_tiny.json").exists()
