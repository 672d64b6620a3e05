"""Paper tables as configs: stages of ordinary training runs, rows read from their evaluators.

    table = tables.load("mplug", "tiny=1")                    # configs/tables/mplug.py
    tables.run(table, output_dir="workdirs/reproduce")         # pretrain -> caption, vqa
    rows = tables.rows(table, output_dir="workdirs/reproduce")
    print(tables.markdown(table, rows))

A table config (`configs/tables/<name>.py`, `get_config(arg)`) holds:

  name, title, note      what the table is; `note` is printed under it
  generated              a generated data collection to prepare first (`data.generated`:
                         'digits_official', 'pydoc_tasks'); '' for none
  bundled                bundled datasets to prepare first (built from installed packages:
                         'pydoc_topics', 'digits_vl'); optional
  data_subdir            the stages read `<data_dir>/<data_subdir>` ('' = data_dir itself)
  stages                 {name: {config: 'configs file[:args]', init_from: '' | the stage
                         it starts from, init_from_path (optional): a run outside the
                         table to start from, overrides: ((dotted key, value), ...)}}; they
                         run each after its init_from stage, otherwise by name
  rows                   [{task, metric, paper, stage, eval, scalars, scale}]: a row's number
                         is `eval`'s scalar(s) `scalars` (comma-separated; several are joined
                         with ' / ') at the stage's last step, times `scale`

Every stage is a normal `train.trainer.train_and_evaluate` run in its own workdir
(`<output_dir>/<table>/<stage>`); a finetuning stage starts from its `init_from` stage's
params. Running a table again resumes every stage where it stopped (a finished stage is not
trained again; final evaluations a kill interrupted are run), so a killed reproduction loses
at most the steps since its last checkpoint. Before any compute, every dataset every stage
reads must be prepared; the error lists the prepare commands.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from metalm_jax import config as config_lib
from metalm_jax import families
from metalm_jax.data import datasets, generated
from metalm_jax.train import trainer

logger = logging.getLogger(__name__)

TABLES_DIR = "tables"  # under configs/
COLUMNS = ("task", "metric", "paper", "ours", "config", "data", "compute")


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/tables/<name>.py`'s `get_config(arg)`."""
  return config_lib.config_module(f"{TABLES_DIR}/{name}").get_config(arg)


def summary(name: str) -> str:
  """The first line of `configs/tables/<name>.py`'s docstring."""
  doc = config_lib.config_module(f"{TABLES_DIR}/{name}").__doc__ or ""
  return doc.strip().splitlines()[0] if doc.strip() else name


def names() -> list[str]:
  """The tables in configs/tables/."""
  folder = os.path.join(config_lib.CONFIGS_DIR, TABLES_DIR)
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_")


def stage_order(table) -> list[str]:
  """The stages, each after the stage it starts from (`init_from`); otherwise by name."""
  order, pending = [], sorted(table.stages.keys())
  while pending:
    ready = [s for s in pending if not table.stages[s].get("init_from")
             or table.stages[s].init_from in order]
    if not ready:
      raise config_lib.ConfigError(f"table {table.name}: stages {pending} start from stages "
                                   "that never run (unknown or circular init_from)")
    order.append(ready[0])
    pending.remove(ready[0])
  return order


def stage_dir(table, stage: str, output_dir: str) -> str:
  return os.path.join(output_dir, table.name, stage)


def stage_config(table, stage: str, *, output_dir: str, data_dir: str) -> ml_collections.ConfigDict:
  """The stage's training config: its config file and args, the table's overrides, the
  data directory and, for a finetuning stage, init_from = the earlier stage's workdir."""
  spec = table.stages[stage]
  name, _, arg = spec.config.partition(":")  # 'mplug:size=tiny,stage=vqa'
  config = config_lib.config_module(name).get_config(arg or None)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  for dotted, value in spec.get("overrides", ()):
    config_lib.set_dotted(config, dotted, value)
  config.data.data_dir = (os.path.join(data_dir, table.data_subdir) if table.data_subdir
                          else data_dir)
  if spec.get("init_from"):
    if spec.init_from not in table.stages:
      raise config_lib.ConfigError(f"table {table.name}: stage {stage!r} starts from unknown "
                                   f"stage {spec.init_from!r}")
    config.init_from.checkpoint = stage_dir(table, spec.init_from, output_dir)
  elif spec.get("init_from_path"):
    config.init_from.checkpoint = spec.init_from_path
  config_lib.validate(config)
  return config


def check_data(table, *, data_dir: str, output_dir: str) -> None:
  """DatasetNotPreparedError naming every dataset a stage reads that is not prepared."""
  missing: dict[str, list[str]] = {}
  for stage in stage_order(table):
    config = stage_config(table, stage, output_dir=output_dir, data_dir=data_dir)
    for name, where in families.build(config).required_datasets():
      if not datasets.get_builder(name, where).is_prepared():
        missing.setdefault(where, [])
        if name not in missing[where]:
          missing[where].append(name)
  if missing:
    lines = [f"table {table.name}: the data its stages read is not prepared:"]
    for where, names_ in missing.items():
      lines += [f"  {datasets.prepare_command(n, where)}" for n in names_]
    lines.append("(official datasets first need their files under <data_dir>/downloads/manual;"
                 " docs/reproducing.md, section Datasets. Nothing is downloaded.)")
    raise datasets.DatasetNotPreparedError("\n".join(lines))


def _timing_path(table, output_dir: str) -> str:
  return os.path.join(output_dir, table.name, "timing.json")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run(table, *, output_dir: str, data_dir: str | None = None,
        stages: tuple[str, ...] | None = None) -> dict[str, dict]:
  """Runs (or resumes) the table's stages in order; returns {stage: train_and_evaluate's
  result}. Wall time per stage (training and its evaluations; a killed run's part is lost, a
  finished stage's re-run final evaluation not added) accumulates in
  `<output_dir>/<table>/timing.json`."""
  data_dir = data_dir or datasets.default_data_dir()
  if table.generated:
    generated.prepare(table.generated, data_dir)
  for name in table.get("bundled", ()):
    datasets.prepare(name, data_dir)
  check_data(table, data_dir=data_dir, output_dir=output_dir)
  timing = _read_json(_timing_path(table, output_dir))
  results = {}
  for stage in stage_order(table):
    if stages is not None and stage not in stages:
      continue
    config = stage_config(table, stage, output_dir=output_dir, data_dir=data_dir)
    workdir = stage_dir(table, stage, output_dir)
    logger.info("table %s: stage %s (%s) in %s", table.name, stage, table.stages[stage].config,
                workdir)
    start = time.time()
    results[stage] = trainer.train_and_evaluate(config, workdir)
    if results[stage].get("stopped"):
      logger.info("table %s: stage %s stopped (%s); run the same command again to resume",
                  table.name, stage, results[stage]["stopped"])
      break
    if results[stage].get("already_complete"):
      continue  # only its final evaluation ran again: no training compute to add
    timing[stage] = timing.get(stage, 0.0) + (time.time() - start)
    os.makedirs(os.path.dirname(_timing_path(table, output_dir)), exist_ok=True)
    with open(_timing_path(table, output_dir), "w") as f:
      json.dump(timing, f, indent=1)
  return results


def final_eval(table, stage: str, name: str, output_dir: str) -> dict:
  """The evaluator `name`'s output at the last step of `stage` (KeyError if not there)."""
  workdir = stage_dir(table, stage, output_dir)
  config = stage_config(table, stage, output_dir=output_dir, data_dir="")
  record = trainer.read_eval(workdir, name, config.num_train_steps)
  if record is None:
    raise KeyError(f"table {table.name}: no result of evaluator {name!r} at step "
                   f"{config.num_train_steps} of stage {stage!r} in {workdir}; run the table")
  return record


def _device() -> str:
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{os.cpu_count()}-core CPU"
  return f"{jax.device_count()} x {device.device_kind}"


def rows(table, *, output_dir: str) -> list[dict]:
  """The table's rows {task, metric, paper, ours, config, data, compute}, from the
  evaluators' outputs of the stages' last steps ('ours' None for a stage not run yet)."""
  timing = _read_json(_timing_path(table, output_dir))
  compute = (f"{sum(timing.values()):.0f} s on {_device()}" if timing else "-")
  out = []
  for row in map(ml_collections.ConfigDict, table.rows):
    spec = table.stages[row.stage]
    config = stage_config(table, row.stage, output_dir=output_dir, data_dir="")
    ev = config.evals[row.eval]
    try:
      measured = final_eval(table, row.stage, row.eval, output_dir)["metrics"]
    except KeyError:
      measured = {}
    keys = [key.strip() for key in row.scalars.split(",")]
    values = ([round(row.get("scale", 1.0) * measured[key], 1) for key in keys]
              if measured else None)
    task = keys[0].rpartition("/")[0]  # '<task>/<metric>' scalars: count that task's examples
    counts = ([f"{task}/num_examples"] if task else []) + ["num_examples", "num_images"]
    count = next((measured[k] for k in counts if k in measured), None)
    data = (f"{ev.get('dataset') or config.data.dataset} "
            f"{ev.get('split') or config.data.eval_split}"
            + (f", {int(count)} examples" if count is not None else ""))
    steps = config.num_train_steps
    out.append(dict(task=row.task, metric=row.metric, paper=row.paper,
                    ours=None if values is None else
                    values[0] if len(values) == 1 else " / ".join(map(str, values)),
                    config=f"{spec.config} ({steps} steps"
                    + (f", from {spec.init_from}" if spec.get("init_from") else "") + ")",
                    data=data, compute=compute))
  return out


def markdown(table, table_rows: list[dict]) -> str:
  lines = [f"## {table.title}", ""]
  if table.note:
    lines += [f"_{table.note}_", ""]
  lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in COLUMNS) + " |"
            for r in table_rows]
  return "\n".join(lines) + "\n"


def write(table, table_rows: list[dict], *, output_dir: str, suffix: str = "") -> str:
  """Writes `<output_dir>/<table><suffix>.md` and `.json`; returns the markdown."""
  text = markdown(table, table_rows)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, f"{table.name}{suffix}.md"), "w") as f:
    f.write(text)
  with open(os.path.join(output_dir, f"{table.name}{suffix}.json"), "w") as f:
    json.dump(table_rows, f, indent=1)
  return text
