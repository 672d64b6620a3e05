r"""The mPLUG table: COCO captioning, VQAv2 (generation and answer ranking), COCO retrieval.

  python experiments/reproduce.py --table=mplug --tiny     # the digits as official files
  python experiments/reproduce.py --table=mplug --data_dir=$DATA   # coco_karpathy + vqav2 prepared

Stages (each an experiments/train.py run of configs/mplug.py in <output_dir>/mplug/<stage>):
  pretrain  ITC + ITM + MLM + PrefixLM on COCO Karpathy train pairs; evaluated by retrieval on
            Karpathy test (ITC top-k_test re-ranked by ITM) and zero-shot captioning
  caption   seq2seq finetuning from pretrain: image + [CLS] -> caption; CIDEr-D / BLEU-4 /
            ROUGE-L on Karpathy test (beam search)
  vqa       from pretrain: image + question -> answer on VQAv2 train; VQA accuracy on
            validation by generation and by ranking the most frequent train answers

Arguments: tiny=1 (CI-sized, on the generated digits_official collection), runlocal=1 (the
stages' runlocal configs at size=test: the test suite's smoke run). Deviations from the paper:
docs/reproducing.md.
"""
import ml_collections

from metalm_jax import config as config_lib

PAPER = {"captioning": "141.0 (COCO Karpathy test, CE)", "vqa": "79.79 (VQAv2 test-dev, base)",
         "retrieval": "- (COCO 5K test, see paper)"}
RUNS = {
    "tiny": dict(size="tiny", pretrain=300, caption=100, vqa=100, limit=64, beam=3, k_test=16,
                 rank_k=16, answers=64, image_size=8),
    "full": dict(size="base", pretrain=10_000, caption=3_000, vqa=4_000, limit=0, beam=5,
                 k_test=256, rank_k=128, answers=3129, image_size=224),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_config_args(arg, tiny="0", runlocal="0")
  tiny, runlocal = args["tiny"] == "1", args["runlocal"] == "1"
  r = RUNS["tiny" if tiny else "full"]
  size = "test" if runlocal else r["size"]  # runlocal: the smallest model, a smoke run
  base = f"mplug:size={size},data=official" + (",runlocal=1" if runlocal else "")

  def overrides(steps: int, evals: dict) -> tuple:
    out = (("model.vision_encoder.image_size", r["image_size"]),)
    if not runlocal:  # runlocal keeps the stage config's smoke-run steps and limits
      out += (("num_train_steps", steps),) + tuple((f"evals.{k}", v) for k, v in evals.items())
    return out

  t = config_lib.table_spec(
      "mplug", title="mplug" + (" (--tiny)" if tiny else ""),
      note=("--tiny: configs/mplug.py size=tiny on the digits written as official COCO / "
            "VQAv2 files; 'ours' measures this code path, not the paper's benchmark" if tiny
            else "COCO-only pretraining from scratch (paper: 14M pairs, CLIP / BERT init)"),
      generated="digits_official" if tiny else "",
      data_subdir="digits_official" if tiny else "")
  t.stages.pretrain = dict(config=f"{base},stage=pretrain", init_from="", overrides=overrides(
      r["pretrain"], {"retrieval.limit": r["limit"], "retrieval.k_test": r["k_test"],
                      "zero_shot_caption.limit": r["limit"],
                      "zero_shot_caption.beam_size": r["beam"]}))
  t.stages.caption = dict(config=f"{base},stage=caption", init_from="pretrain",
                          overrides=overrides(r["caption"], {"caption.limit": r["limit"],
                                                             "caption.beam_size": r["beam"]}))
  t.stages.vqa = dict(config=f"{base},stage=vqa", init_from="pretrain", overrides=overrides(
      r["vqa"], {"vqa.limit": r["limit"], "vqa.beam_size": r["beam"],
                 "vqa_rank.limit": r["limit"], "vqa_rank.rank_k": r["rank_k"],
                 "vqa_rank.answer_list_size": r["answers"]}))
  row = lambda task, metric, paper, stage, ev, keys: dict(
      task=task, metric=metric, paper=paper, stage=stage, eval=ev, scalars=keys, scale=100.0)
  recall = "R@1 / R@5 / R@10"
  t.rows = [
      row("captioning", "CIDEr-D (x100)", PAPER["captioning"], "caption", "caption", "cider_d"),
      row("captioning", "BLEU-4 (x100)", "- (see paper)", "caption", "caption", "bleu4"),
      row("captioning", "ROUGE-L (x100)", "- (see paper)", "caption", "caption", "rouge_l"),
      row("VQA (generation)", "VQA acc", PAPER["vqa"], "vqa", "vqa", "accuracy"),
      row("VQA (answer ranking)", "VQA acc", PAPER["vqa"], "vqa", "vqa_rank", "accuracy"),
      row("image-to-text retrieval", recall, PAPER["retrieval"], "pretrain", "retrieval",
          "i2t_R1,i2t_R5,i2t_R10"),
      row("text-to-image retrieval", recall, PAPER["retrieval"], "pretrain", "retrieval",
          "t2i_R1,t2i_R5,t2i_R10"),
  ]
  return t
