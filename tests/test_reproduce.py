"""experiments/reproduce.py: tables as stages of train.py runs, resumed where a kill left them;
every table's --tiny path end to end (slow); clear errors."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from metalm_jax import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce.py")
TRAINING_TABLES = tuple(tables.names())  # every configs/tables/*.py
TABLES = TRAINING_TABLES + ("hybrid_latency", "hybrid_frames")
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
  assert out.returncode != 0 and "--table='nope'" in out.stderr
  empty = f"--data_dir={tmp_path}/empty"
  # Full size without the official datasets: says which, how to prepare them, and --tiny.
  out = run("--table=mplug", f"--output_dir={tmp_path}", empty)
  assert out.returncode != 0 and "--tiny" in out.stderr, out.stderr[-2000:]
  for name in ("coco_karpathy", "vqav2"):
    assert f"prepare_data.py --dataset={name}" in out.stderr
  out = run("--table=metalm_vl", f"--output_dir={tmp_path}", empty)
  assert out.returncode != 0 and "--tiny" in out.stderr, out.stderr[-2000:]
  for name in ("coco_karpathy", "vqav2", "ok_vqa", "nlvr2"):
    assert f"prepare_data.py --dataset={name}" in out.stderr
  assert not list(tmp_path.glob("*/*/checkpoints"))  # nothing was trained
  out = run("--table=metalm_multitask", f"--output_dir={tmp_path}")
  assert out.returncode != 0 and "--pretrained=" in out.stderr
  assert "squad_v1" in out.stderr and "--tiny" in out.stderr


@pytest.mark.parametrize("name", TRAINING_TABLES)
def test_every_table_config_builds_its_stages(name, tmp_path):
  """Each stage is a valid train.py config; finetunes start from an earlier stage."""
  for arg in ("tiny=1", "tiny=1,runlocal=1"):
    table = tables.load(name, arg)
    order = tables.stage_order(table)
    for stage in order:
      config = tables.stage_config(table, stage, output_dir=str(tmp_path), data_dir="/d")
      init = table.stages[stage].get("init_from")
      if init:
        assert order.index(init) < order.index(stage)
        assert config.init_from.checkpoint == tables.stage_dir(table, init, str(tmp_path))
    for row in table.rows:  # every row names an evaluator its stage has
      config = tables.stage_config(table, row["stage"], output_dir=str(tmp_path),
                                   data_dir="/d")
      assert row["eval"] in config.evals, (name, row)


def _train_rows(workdir: pathlib.Path) -> list[int]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines()
          if '"train"' in line]


def _finished_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def test_a_killed_table_run_resumes_where_it_stopped(tmp_path):
  """The mplug table (its smoke-run stages): SIGKILL while the second stage trains, run the
  same command again: the finished stage is not trained again, the killed stage resumes from
  its checkpoint, and the table is written with every row measured."""
  out_dir, data_dir = tmp_path / "out", tmp_path / "data"
  cmd = [sys.executable, SCRIPT, "--table=mplug", "--tiny", "--runlocal",
         f"--output_dir={out_dir}", f"--data_dir={data_dir}"]
  caption = out_dir / "mplug" / "caption"
  log = open(tmp_path / "first_run.log", "w")  # a file, not a pipe nobody reads
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  start = time.time()
  # Kill once the caption stage has a finished checkpoint (steps 2 or 4; saves are async).
  while not _finished_steps(caption) and proc.poll() is None:
    assert time.time() - start < 900, "the caption stage wrote no checkpoint"
    time.sleep(0.05)
  assert proc.poll() is None, (tmp_path / "first_run.log").read_text()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.close()
  pretrain_rows = _train_rows(out_dir / "mplug" / "pretrain")
  killed_rows = _train_rows(caption)
  assert pretrain_rows and pretrain_rows[-1] == 6 and killed_rows
  timing = json.loads((out_dir / "mplug" / "timing.json").read_text())
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _train_rows(out_dir / "mplug" / "pretrain") == pretrain_rows  # not trained again
  # ... and its compute is not counted again (only its final evaluation re-ran).
  again_timing = json.loads((out_dir / "mplug" / "timing.json").read_text())
  assert again_timing["pretrain"] == timing["pretrain"] and "caption" in again_timing
  resumed = _train_rows(caption)
  assert resumed[:len(killed_rows)] == killed_rows and resumed[-1] == 6
  # The killed stage continued from its checkpoint; it did not start over from the pretrained
  # params (whose first logged step would be 2 again).
  assert resumed[len(killed_rows)] > 2, resumed
  rows = json.loads((out_dir / "mplug_tiny.json").read_text())
  assert [r["task"] for r in rows] == EXPECTED_TASKS["mplug"]
  assert all(r["ours"] is not None for r in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_tiny_table_end_to_end(table, tmp_path):
  """REPRODUCE_OUTPUT_DIR=dir keeps the tables (docs/reproducing.md shows such a run)."""
  out_dir = pathlib.Path(os.environ.get("REPRODUCE_OUTPUT_DIR") or tmp_path)
  out = run(f"--table={table}", "--tiny", f"--output_dir={out_dir}",
            f"--data_dir={tmp_path}/data", timeout=7200)
  assert out.returncode == 0, out.stderr[-3000:]
  text = (out_dir / f"{table}_tiny.md").read_text()
  assert text.startswith(f"## {table} (--tiny)") or table in ("metalm_digits", "mplug_digits")
  assert "| task | metric | paper | ours | config | data | compute |" in text
  rows = json.loads((out_dir / f"{table}_tiny.json").read_text())
  assert rows and all(r["ours"] is not None for r in rows), rows  # every row was measured
  if table in EXPECTED_TASKS:
    assert [r["task"] for r in rows] == EXPECTED_TASKS[table]
