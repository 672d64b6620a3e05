"""The text-to-text builders (metalm_jax.data.text_tasks) on tiny files in the official
formats, and the pydoc-generated files of the CI-sized multitask run."""
import hashlib
import json
import os
import re
import shutil

import pytest

from metalm_jax.data import datasets
from metalm_jax.data import official
from metalm_jax.data import pydoc_corpus
from metalm_jax.data import text_tasks

CNN_URL = ("http://web.archive.org/web/20150401100102id_/http://www.cnn.com/2015/04/01/"
           "europe/france-germanwings-plane-crash-main/")
CNN_SHA1 = "469c6ac05092ca5997728c9dfc19f9ab6b936e40"  # `printf %s $CNN_URL | sha1sum`
DM_URL = "http://www.dailymail.co.uk/news/article-1.html"
DM_SHA1 = "6a05bab4b1309310e23de07757be636f4754c9b3"
EMPTY_URL = "http://www.dailymail.co.uk/news/article-2.html"  # a story without article
VAL_URL = "http://www.cnn.com/val/1.html"
TEST_URL = "http://www.dailymail.co.uk/test/1.html"

SQUAD_TRAIN = {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [{
    "context": "Super Bowl 50 was played in Santa Clara, California.",
    "qas": [{"id": "56be4db0acb8001400a502ec", "question": "Where was Super Bowl 50 played?",
             "answers": [{"answer_start": 28, "text": "Santa Clara"}]},
            {"id": "56be4db0acb8001400a502ed", "question": "Which Super Bowl was it? ",
             "answers": [{"answer_start": 0, "text": "Super Bowl 50"}]}]}]}]}
SQUAD_DEV = {"version": "1.1", "data": [{"title": "Normans", "paragraphs": [{
    "context": "The Normans gave their name to Normandy, a region in France.",
    "qas": [{"id": "56ddde6b9a695914005b9628", "question": "In what country is Normandy?",
             "answers": [{"answer_start": 55, "text": "France"},
                         {"answer_start": 55, "text": "France"},
                         {"answer_start": 52, "text": "in France"}]}]}]}]}

SUPERGLUE = {
    "BoolQ": {
        "train": [{"question": "is france in europe", "passage": "France is in Europe.",
                   "idx": 0, "label": True},
                  {"question": "is paris a river?", "passage": "Paris is a city.", "idx": 1,
                   "label": False}],
        "val": [{"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0,
                 "label": True}],
        "test": [{"question": "no label", "passage": "Test.", "idx": 0}],
    },
    "CB": {
        "train": [{"premise": "It rained.", "hypothesis": "The ground is wet.",
                   "label": "entailment", "idx": 0},
                  {"premise": "It is dry.", "hypothesis": "It rained.",
                   "label": "contradiction", "idx": 1},
                  {"premise": "He left.", "hypothesis": "He was sad.", "label": "neutral",
                   "idx": 2}],
        "val": [{"premise": "A dog.", "hypothesis": "An animal.", "label": "entailment",
                 "idx": 0}],
    },
    "RTE": {
        "train": [{"premise": "Cats purr.", "hypothesis": "Cats make sounds.",
                   "label": "entailment", "idx": 0},
                  {"premise": "Cats purr.", "hypothesis": "Cats bark.",
                   "label": "not_entailment", "idx": 1}],
        "val": [{"premise": "Ice melts.", "hypothesis": "Ice is hot.",
                 "label": "not_entailment", "idx": 7}],
    },
    "COPA": {
        "train": [{"premise": "My body cast a shadow over the grass.",
                   "choice1": "The sun was rising.", "choice2": "The grass was cut.",
                   "question": "cause", "label": 0, "idx": 1},
                  {"premise": "The woman tolerated her friend's difficult behavior.",
                   "choice1": "The woman knew her friend was going through a hard time.",
                   "choice2": "The woman felt that her friend took advantage of her kindness.",
                   "question": "effect", "label": 1, "idx": 2}],
        "val": [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
                 "choice2": "Water flowed from the spout.", "question": "effect",
                 "label": 1, "idx": 101}],
    },
}

STORIES = {  # url -> (stories directory, .story text)
    CNN_URL: ("cnn", "(CNN) -- The plane crashed\n\nInvestigators said it was deliberate.\n\n"
                     "@highlight\n\nThe plane crashed in the Alps\n\n@highlight\n\n"
                     "Investigators blame the co-pilot!\n"),
    DM_URL: ("dailymail", "By Reporter .\n\nA cat was found \"alive\"\n\n@highlight\n\n"
                          "Cat found\n"),
    EMPTY_URL: ("dailymail", "@highlight\n\nNo article here\n"),
    VAL_URL: ("cnn", "Validation story.\n\n@highlight\n\nval highlight\n"),
    TEST_URL: ("dailymail", "Test story\n\n@highlight\n\nTest highlight.\n"),
}
URL_LISTS = {"all_train.txt": [CNN_URL, "", DM_URL + "  ", EMPTY_URL, CNN_URL],
             "all_val.txt": [VAL_URL], "all_test.txt": [TEST_URL]}

TEXT_NAMES = ("squad_v1", "superglue/boolq", "superglue/cb", "superglue/rte",
              "superglue/copa", "cnn_dailymail")


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_text_tree(root: str) -> None:
  """A miniature manual dir in the official formats and layout of every text dataset."""
  _write(f"{root}/squad/train-v1.1.json", json.dumps(SQUAD_TRAIN))
  _write(f"{root}/squad/dev-v1.1.json", json.dumps(SQUAD_DEV))
  for task, files in SUPERGLUE.items():
    for name, rows in files.items():
      _write(f"{root}/superglue/{task}/{name}.jsonl", "".join(json.dumps(r) + "\n"
                                                              for r in rows))
  for url, (directory, text) in STORIES.items():
    _write(f"{root}/cnn_dailymail/{directory}/stories/"
           f"{hashlib.sha1(url.encode()).hexdigest()}.story", text)
  for name, urls in URL_LISTS.items():
    _write(f"{root}/cnn_dailymail/url_lists/{name}", "".join(u + "\n" for u in urls))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Every text dataset built once, from <data_dir>/downloads/manual (the default)."""
  data_dir = str(tmp_path_factory.mktemp("text"))
  write_text_tree(os.path.join(data_dir, "downloads", "manual"))
  for name in TEXT_NAMES:
    datasets.prepare(name, data_dir)
  return data_dir


def read(name, split, data_dir):
  source = datasets.data_source(name, split, data_dir)
  return [{k: ([x.decode() for x in v] if k == "references" else v.decode())
           for k, v in source[i].items()} for i in range(len(source))]


def test_text_builders_are_registered_with_uniform_features():
  for name in ("squad_v1", "superglue", "cnn_dailymail"):
    assert datasets.DATASETS[name] is text_tasks.BUILDERS[name]
  assert [c.name for c in text_tasks.Superglue.BUILDER_CONFIGS] == ["boolq", "cb", "rte",
                                                                    "copa"]
  assert text_tasks.SquadV1.BUILDER_CONFIGS == []  # no image configs
  features = text_tasks.text_features()
  assert sorted(features.keys()) == ["id", "inputs", "references", "targets", "task"]


def test_squad_v1_one_example_per_question_with_every_answer(data_dir):
  assert read("squad_v1", "train", data_dir) == [
      {"id": "56be4db0acb8001400a502ec", "task": "squad_v1",
       "inputs": "question: Where was Super Bowl 50 played? context: Super Bowl 50 was "
                 "played in Santa Clara, California.",
       "targets": "Santa Clara", "references": ["Santa Clara"]},
      {"id": "56be4db0acb8001400a502ed", "task": "squad_v1",
       "inputs": "question: Which Super Bowl was it? context: Super Bowl 50 was played in "
                 "Santa Clara, California.",
       "targets": "Super Bowl 50", "references": ["Super Bowl 50"]}]
  assert read("squad_v1", "validation", data_dir) == [
      {"id": "56ddde6b9a695914005b9628", "task": "squad_v1",
       "inputs": "question: In what country is Normandy? context: The Normans gave their "
                 "name to Normandy, a region in France.",
       "targets": "France", "references": ["France", "France", "in France"]}]


def test_superglue_boolq_and_cb(data_dir):
  assert read("superglue/boolq", "train", data_dir) == [
      {"id": "0", "task": "boolq", "inputs": "France is in Europe. question: is france in "
       "europe? yes or no?", "targets": "yes", "references": ["yes"]},
      {"id": "1", "task": "boolq", "inputs": "Paris is a city. question: is paris a river? "
       "yes or no?", "targets": "no", "references": ["no"]}]
  assert [e["inputs"] for e in read("superglue/boolq", "validation", data_dir)] == [
      "The sky is blue. question: is the sky blue? yes or no?"]  # test.jsonl: not read
  cb = read("superglue/cb", "train", data_dir)
  assert [(e["id"], e["task"], e["targets"], e["references"]) for e in cb] == [
      ("0", "cb", "yes", ["yes"]), ("1", "cb", "no", ["no"]), ("2", "cb", "maybe", ["maybe"])]
  assert cb[0]["inputs"] == ("premise: It rained. hypothesis: The ground is wet. does the "
                             "premise entail the hypothesis? yes, no, or maybe?")
  assert [e["targets"] for e in read("superglue/cb", "validation", data_dir)] == ["yes"]


def test_superglue_rte_and_copa(data_dir):
  rte = read("superglue/rte", "train", data_dir)
  assert [(e["id"], e["task"], e["targets"]) for e in rte] == [("0", "rte", "yes"),
                                                                ("1", "rte", "no")]
  assert rte[1]["inputs"] == ("premise: Cats purr. hypothesis: Cats bark. does the premise "
                              "entail the hypothesis? yes or no?")
  assert [(e["id"], e["targets"]) for e in read("superglue/rte", "validation", data_dir)] == [
      ("7", "no")]
  copa = read("superglue/copa", "train", data_dir)
  assert copa[0] == {
      "id": "1", "task": "copa",
      "inputs": "premise: My body cast a shadow over the grass. what was the cause? option 1: "
                "The sun was rising. option 2: The grass was cut.",
      "targets": "The sun was rising.", "references": ["The sun was rising."]}
  assert copa[1]["targets"] == "The woman felt that her friend took advantage of her kindness."
  assert "what was the effect?" in copa[1]["inputs"]
  assert [(e["id"], e["targets"]) for e in read("superglue/copa", "validation", data_dir)] == [
      ("101", "Water flowed from the spout.")]


def test_superglue_rejects_unknown_labels():
  with pytest.raises(ValueError, match=r"CB/val.jsonl: example idx=3 has label 'unknown'"):
    text_tasks.superglue_example("cb", {"premise": "a", "hypothesis": "b", "label": "unknown",
                                        "idx": 3}, source="superglue/CB/val.jsonl")
  with pytest.raises(ValueError, match="expected true or false"):
    text_tasks.superglue_example("boolq", {"question": "q", "passage": "p", "idx": 0})
  with pytest.raises(ValueError, match="expected 0 or 1"):
    text_tasks.superglue_example("copa", {"premise": "p", "choice1": "a", "choice2": "b",
                                          "question": "cause", "label": 2, "idx": 0})


def test_cnn_dailymail_follows_the_url_lists(data_dir):
  train = read("cnn_dailymail", "train", data_dir)
  # List order; the story without article is skipped; a repeated URL counts once.
  assert train == [
      {"id": CNN_SHA1, "task": "cnn_dailymail",
       "inputs": "summarize: (CNN) -- The plane crashed. Investigators said it was "
                 "deliberate.",
       "targets": "The plane crashed in the Alps. Investigators blame the co-pilot!",
       "references": ["The plane crashed in the Alps. Investigators blame the co-pilot!"]},
      {"id": DM_SHA1, "task": "cnn_dailymail",
       "inputs": 'summarize: By Reporter . A cat was found "alive"',
       "targets": "Cat found.", "references": ["Cat found."]}]
  validation = read("cnn_dailymail", "validation", data_dir)
  test = read("cnn_dailymail", "test", data_dir)
  assert [(e["inputs"], e["targets"]) for e in validation] == [
      ("summarize: Validation story.", "val highlight.")]
  assert [(e["inputs"], e["targets"]) for e in test] == [
      ("summarize: Test story.", "Test highlight.")]


def test_story_file_names_and_highlight_parsing():
  assert text_tasks.story_filename(CNN_URL) == CNN_SHA1 + ".story"
  assert text_tasks.story_filename(DM_URL) == DM_SHA1 + ".story"
  article, highlights = text_tasks.parse_story(
      "  First paragraph\n\nSecond one?\n\n\n@highlight\n\n first point \n\n@highlight\n\n"
      "Second point (sic)\n\n@highlight\n\nThird \u201cquoted\u201d\n")
  assert article == "First paragraph. Second one?"
  assert highlights == ["first point.", "Second point (sic)", "Third \u201cquoted\u201d"]
  assert text_tasks.parse_story("@highlight\n\nonly a highlight") == ("", [
      "only a highlight."])
  assert text_tasks.parse_story("Only an article") == ("Only an article.", [])


def test_missing_manual_dir_says_what_to_download_and_where(tmp_path):
  needles = {"squad_v1": ["rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",
                          "squad/dev-v1.1.json"],
             "superglue/boolq": ["dl.fbaipublicfiles.com/glue/superglue/data/v2/BoolQ.zip",
                                 "superglue/BoolQ/val.jsonl"],
             "superglue/copa": ["v2/COPA.zip", "superglue/COPA/train.jsonl"],
             "cnn_dailymail": ["cs.nyu.edu/~kcho/DMQA/", "cnn_stories.tgz",
                               "dailymail_stories.tgz", "abisee/cnn-dailymail",
                               "cnn_dailymail/url_lists/all_val.txt"]}
  for name, expected in needles.items():
    with pytest.raises(official.ManualFilesMissingError) as error:
      datasets.prepare(name, str(tmp_path / "data"), manual_dir=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "prepare_data.py" in message
    builder = datasets.get_builder(name, str(tmp_path / "data"))
    missing = message.split("Missing:\n")[1].split("\n\n")[0]
    assert missing == "\n".join(f"  {f.path}" for f in builder.REQUIRED), name
    for f in type(builder).REQUIRED:  # the instructions name every file
      assert f"<manual_dir>/{f.path}" in message
    for needle in expected:
      assert needle in message, (name, needle)
  with pytest.raises(datasets.DatasetNotPreparedError, match="downloads/manual"):
    datasets.data_source("squad_v1", "train", str(tmp_path / "data"))


def test_incomplete_manual_dir_names_the_missing_file(tmp_path):
  manual = tmp_path / "manual"
  write_text_tree(str(manual))
  (manual / "superglue" / "CB" / "val.jsonl").unlink()
  with pytest.raises(official.ManualFilesMissingError,
                     match=r"Missing:\n  superglue/CB/val.jsonl\n\n"):
    datasets.prepare("superglue/cb", str(tmp_path / "data"), manual_dir=str(manual))
  assert not datasets.get_builder("superglue/cb", str(tmp_path / "data")).is_prepared()
  # Another config needs only its own files.
  datasets.prepare("superglue/rte", str(tmp_path / "data"), manual_dir=str(manual))
  (manual / "squad" / "train-v1.1.json").unlink()
  with pytest.raises(official.ManualFilesMissingError,
                     match=r"Missing:\n  squad/train-v1.1.json\n\n"):
    datasets.prepare("squad_v1", str(tmp_path / "data"), manual_dir=str(manual))
  (manual / "cnn_dailymail" / "dailymail" / "stories" / f"{DM_SHA1}.story").unlink()
  with pytest.raises(official.ManualFilesMissingError,
                     match=r"1 stories listed in url_lists/all_train.txt are missing.*\n"
                     rf"Missing:\n  cnn_dailymail/{{cnn,dailymail}}/stories/{DM_SHA1}.story"
                     rf"  \(for {re.escape(DM_URL)}\)"):
    datasets.prepare("cnn_dailymail", str(tmp_path / "data"), manual_dir=str(manual))


# ---------------------------------------------------------------------------------------
# Files generated from pydoc pages
# ---------------------------------------------------------------------------------------

PYDOC_NAMES = {"squad_v1": "squad_v1", "boolq": "superglue/boolq",
               "cnn_dailymail": "cnn_dailymail"}


@pytest.fixture(scope="module")
def pydoc_tasks(tmp_path_factory):
  """(manual_dir, data_dir, counts): the generated files, built by the three builders."""
  root = tmp_path_factory.mktemp("pydoc_tasks")
  manual, data_dir = str(root / "manual"), str(root / "data")
  counts = text_tasks.write_pydoc_task_files(manual)
  for name in PYDOC_NAMES.values():
    datasets.prepare(name, data_dir, manual_dir=manual)
  return manual, data_dir, counts


def tree(root) -> dict[str, bytes]:
  out = {}
  for directory, _, files in os.walk(root):
    for f in files:
      path = os.path.join(directory, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def test_pydoc_files_build_with_the_counts_returned(pydoc_tasks):
  _, data_dir, counts = pydoc_tasks
  built = {}
  for task, name in PYDOC_NAMES.items():
    info = datasets.get_builder(name, data_dir).info
    built[task] = {s: info.splits[s].num_examples for s in sorted(info.splits)}
  assert built == counts
  assert counts["boolq"]["train"] == text_tasks.PYDOC_TRAIN_PASSAGES
  # Two questions per passage, less those whose answer would be an article (SQuAD's
  # normalisation erases it).
  for split in ("train", "validation"):
    assert 1.5 * counts["boolq"][split] < counts["squad_v1"][split] < 2 * counts["boolq"][split]
  assert (counts["cnn_dailymail"]["train"], counts["cnn_dailymail"]["validation"],
          counts["cnn_dailymail"]["test"]) == (counts["boolq"]["train"],
                                                counts["boolq"]["validation"],
                                                counts["boolq"]["validation"])
  assert counts["boolq"]["validation"] >= 50


def test_pydoc_squad_answers_are_spans_at_answer_start(pydoc_tasks):
  manual, data_dir, _ = pydoc_tasks
  for split, path in text_tasks.SQUAD_SPLITS.items():
    with open(os.path.join(manual, path)) as f:
      data = json.load(f)
    assert data["version"] == "1.1"
    n = 0
    for article in data["data"]:
      for paragraph in article["paragraphs"]:
        context = paragraph["context"]
        assert 16 <= len(context.split()) <= 40
        words = [w for w in (re.findall(r"\w+", context)[0], re.findall(r"\w+", context)[-1])
                 if w.lower() not in ("a", "an", "the")]  # article answers are not asked
        assert len(paragraph["qas"]) == len(words)
        for qa, expected in zip(paragraph["qas"], words):
          assert len(qa["answers"]) == (3 if split == "validation" else 1)
          for a in qa["answers"]:
            start = a["answer_start"]
            assert context[start:start + len(a["text"])] == a["text"] == expected
          n += 1
    assert n == len(datasets.data_source("squad_v1", split, data_dir))
  first = datasets.data_source("squad_v1", "validation", data_dir)[0]
  context = first["inputs"].decode().split(" context: ", 1)[1]
  assert re.match(r"question: what is the (first|last) word of the passage\? context: ",
                  first["inputs"].decode())
  assert first["targets"].decode() in re.findall(r"\w+", context)
  assert first["targets"].decode().lower() not in ("a", "an", "the")


def test_pydoc_boolq_is_balanced_and_answerable_from_the_passage(pydoc_tasks):
  manual, _, counts = pydoc_tasks
  for name, split in (("train", "train"), ("val", "validation")):
    with open(os.path.join(manual, f"superglue/BoolQ/{name}.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == counts["boolq"][split]
    labels = [r["label"] for r in rows]
    assert labels.count(True) == (len(rows) + 1) // 2
    assert labels[:8] != [True, False] * 4  # shuffled, not alternating
    assert [r["idx"] for r in rows] == list(range(len(rows)))
    for r in rows:
      word = r["question"].removeprefix("does the passage mention ")
      assert word != r["question"] and word.isalpha()
      present = word in {w.lower() for w in re.findall(r"\w+", r["passage"])}
      assert present == r["label"], r


def test_pydoc_validation_topics_are_not_in_training_files(pydoc_tasks):
  manual, _, _ = pydoc_tasks

  def squad_topics(name):
    with open(os.path.join(manual, "squad", name)) as f:
      return {a["title"] for a in json.load(f)["data"]}

  def url_topics(name):
    with open(os.path.join(manual, "cnn_dailymail", "url_lists", name)) as f:
      return {line.split("/")[3] for line in f if line.strip()}

  def passages(name):
    with open(os.path.join(manual, "superglue", "BoolQ", name)) as f:
      return {json.loads(line)["passage"] for line in f}

  train, dev = squad_topics("train-v1.1.json"), squad_topics("dev-v1.1.json")
  assert {pydoc_corpus.split_of(t) for t in train} == {"train"}
  assert {pydoc_corpus.split_of(t) for t in dev} == {"validation"}
  assert len(dev) >= 5 and len(train) >= 40
  assert url_topics("all_train.txt") == train
  assert url_topics("all_val.txt") == url_topics("all_test.txt") == dev
  assert not passages("train.jsonl") & passages("val.jsonl")


def test_pydoc_summaries_are_the_article_lead(pydoc_tasks):
  manual, data_dir, _ = pydoc_tasks
  examples = datasets.data_source("cnn_dailymail", "validation", data_dir)
  for i in range(len(examples)):
    ex = examples[i]
    article = ex["inputs"].decode().removeprefix("summarize: ")
    target = ex["targets"].decode()
    assert 1 <= len(target.split()) <= text_tasks.PYDOC_HIGHLIGHT_WORDS
    assert article.startswith(target.removesuffix(".")), (article, target)
  with open(os.path.join(manual, "cnn_dailymail", "url_lists", "all_val.txt")) as f:
    url = f.readline().strip()
  assert re.fullmatch(r"http://pydoc\.local/[\w-]+/\d+", url)
  assert examples[0]["id"].decode() == hashlib.sha1(url.encode()).hexdigest()
  for directory in ("cnn", "dailymail"):  # stories in both directories
    assert len(os.listdir(os.path.join(manual, "cnn_dailymail", directory, "stories"))) >= 100


def test_pydoc_files_are_deterministic_and_guard_real_data(pydoc_tasks, tmp_path):
  manual, _, counts = pydoc_tasks
  again = text_tasks.write_pydoc_task_files(str(tmp_path / "again"))
  assert again == counts
  first, second = tree(manual), tree(str(tmp_path / "again"))
  assert sorted(first) == sorted(second) and first == second
  other = text_tasks.write_pydoc_task_files(str(tmp_path / "seed1"), seed=1)
  # Other train passages: the same counts but SQuAD's (its article answers are not asked).
  assert {k: v for k, v in other.items() if k != "squad_v1"} == {
      k: v for k, v in counts.items() if k != "squad_v1"}
  assert tree(str(tmp_path / "seed1"))["superglue/BoolQ/train.jsonl"] != first[
      "superglue/BoolQ/train.jsonl"]
  # Rewriting its own dir is fine; a dir with real data is left alone.
  assert text_tasks.write_pydoc_task_files(str(tmp_path / "again")) == counts
  real = tmp_path / "real"
  _write(str(real / "squad" / "dev-v1.1.json"), "{}")
  with pytest.raises(FileExistsError, match="dev-v1.1.json"):
    text_tasks.write_pydoc_task_files(str(real))
  assert (real / "squad" / "dev-v1.1.json").read_text() == "{}"


def test_pydoc_max_topics_limits_each_split(tmp_path):
  counts = text_tasks.write_pydoc_task_files(str(tmp_path / "small"), max_topics=2)
  with open(tmp_path / "small" / "squad" / "dev-v1.1.json") as f:
    dev = [a["title"] for a in json.load(f)["data"]]
  with open(tmp_path / "small" / "squad" / "train-v1.1.json") as f:
    train = [a["title"] for a in json.load(f)["data"]]
  assert dev == sorted(t for t in text_tasks.pydoc_topics.topics
                       if pydoc_corpus.split_of(t) == "validation")[:2]
  assert len(train) == 2
  assert 0 < counts["boolq"]["train"] < 60 and 0 < counts["boolq"]["validation"] < 30
  shutil.rmtree(tmp_path / "small")
