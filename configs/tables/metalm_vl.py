r"""The METALM vision-language table: zero- / few-shot VQAv2, OK-VQA and COCO captioning,
and finetuned VQAv2, OK-VQA, COCO captioning and NLVR2.

  python experiments/reproduce.py --table=metalm_vl --tiny     # the digits as official files
  python experiments/reproduce.py --table=metalm_vl --data_dir=$DATA   # official data prepared

Stages (experiments/train.py runs of configs/metalm_vl.py in <output_dir>/metalm_vl/<stage>):
  pretrain          semi-causal VL pretraining on COCO Karpathy train captions; evaluated
                    zero-shot and k-shot (each demonstration its own encoder span)
  vqav2, ok_vqa,    one finetune per task from pretrain (images + prompt in the encoder, the
  coco, nlvr2       answer is the target), each evaluated on its task

Arguments: tiny=1 (CI-sized, on the generated digits_official collection), runlocal=1 (the
stages' runlocal configs at size=test: the test suite's smoke run). Deviations from the paper:
docs/reproducing.md.
"""
import ml_collections

from metalm_jax import config as config_lib

PAPER = {("vqav2", "zero"): "41.1 (VQAv2, zero-shot)",
         ("ok_vqa", "zero"): "11.4 (OK-VQA, zero-shot)"}
NAMES = {"vqav2": "VQAv2", "ok_vqa": "OK-VQA", "coco": "COCO captioning", "nlvr2": "NLVR2"}
RUNS = {
    "tiny": dict(size="tiny", pretrain=300, finetune=100, shots=2, limit=64),
    "full": dict(size="paper", pretrain=350_000, finetune=20_000, shots=4, limit=0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, tiny="0", runlocal="0")
  tiny, runlocal = args["tiny"] == "1", args["runlocal"] == "1"
  r = RUNS["tiny" if tiny else "full"]
  size = "test" if runlocal else r["size"]  # runlocal: the smallest model, a smoke run
  base = f"metalm_vl:size={size},data=official" + (",runlocal=1" if runlocal else "")

  def overrides(steps: int, evals: dict) -> tuple:
    if runlocal:  # the stage config's smoke-run steps and limits
      return ()
    return (("num_train_steps", steps),) + tuple((f"evals.{k}", v) for k, v in evals.items())

  t = config_lib.table_spec(
      "metalm_vl", title="metalm_vl" + (" (--tiny)" if tiny else ""),
      note=("--tiny: configs/metalm_vl.py size=tiny on the digits written as official COCO / "
            "VQAv2 / OK-VQA / NLVR2 files; 'ours' measures this code path, not the paper's "
            "benchmark" if tiny else
            "pretrained on COCO captions only, from scratch; greedy decoding"),
      generated="digits_official" if tiny else "",
      data_subdir="digits_official" if tiny else "")
  zero_few = {}
  for name in ("vqav2", "ok_vqa", "coco"):
    zero_few.update({f"{name}.limit": r["limit"], f"{name}_fewshot.limit": r["limit"],
                     f"{name}_fewshot.shots": r["shots"]})
  t.stages.pretrain = dict(config=f"{base},stage=pretrain", init_from="",
                           overrides=overrides(r["pretrain"], zero_few))
  for task in ("vqav2", "ok_vqa", "coco", "nlvr2"):
    t.stages[task] = dict(config=f"{base},stage=finetune,task={task}", init_from="pretrain",
                          overrides=overrides(r["finetune"], {f"{task}.limit": r["limit"]}))
  rows = []
  for setting, label, suffix in (("zero", "zero-shot", ""), ("few", f"{r['shots']}-shot",
                                                               "_fewshot")):
    for task in ("vqav2", "ok_vqa", "coco"):
      rows.append(_row(task, label, PAPER.get((task, setting), "- (see paper)"), "pretrain",
                       task + suffix))
  for task in ("vqav2", "ok_vqa", "coco", "nlvr2"):
    rows.append(_row(task, "finetuned", "- (see paper)", task, task))
  t.rows = rows
  return t


def _row(task: str, label: str, paper: str, stage: str, evaluator: str) -> dict:
  metric, key = (("CIDEr-D (x100)", "cider_d") if task == "coco" else
                 ("accuracy", "accuracy") if task == "nlvr2" else ("VQA acc", "accuracy"))
  return dict(task=f"{NAMES[task]} {label}", metric=metric, paper=paper, stage=stage,
              eval=evaluator, scalars=key, scale=100.0)
