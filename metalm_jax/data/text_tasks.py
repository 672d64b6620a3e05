"""Text-to-text tasks for METALM's multitask language finetuning, from the official files.

TFDS builders (array_record, readable without TensorFlow through `datasets.data_source`)
that read the files each dataset's authors publish from a `manual_dir` (as in `official`;
nothing is ever downloaded at run time) and turn every example into one uniform
text-to-text example:

  id          Text: the official example id (SQuAD's question id, SuperGLUE's `idx`, the
              CNN/DailyMail story's SHA-1 file stem)
  task        Text: 'squad_v1' | 'boolq' | 'cb' | 'rte' | 'copa' | 'cnn_dailymail'
  inputs      Text: the model input, one template per task (below)
  targets     Text: the training target: an answer, a label word or a summary
  references  Sequence(Text): every acceptable answer, for EM / F1 / ROUGE: all the answer
              texts of a SQuAD question (in file order, duplicates kept), else [targets]

Datasets (`datasets.prepare(name, data_dir, manual_dir=...)`):

  squad_v1          SQuAD v1.1 (Rajpurkar et al., 2016): train / validation (dev-v1.1)
  superglue/boolq   SuperGLUE v2 BoolQ: train / validation (val.jsonl)
  superglue/cb      SuperGLUE v2 CommitmentBank: train / validation
  superglue/rte     SuperGLUE v2 RTE: train / validation
  superglue/copa    SuperGLUE v2 COPA: train / validation
  cnn_dailymail     CNN / DailyMail, non-anonymized (See et al., 2017): train / validation /
                    test

Official files, under `<manual_dir>` (default `<data_dir>/downloads/manual/`):

  squad/train-v1.1.json          https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json
  squad/dev-v1.1.json            https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json
      {"version": "1.1", "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
       "question", "answers": [{"answer_start", "text"}, ...]}]}]}]}
  superglue/BoolQ/{train,val}.jsonl
      https://dl.fbaipublicfiles.com/glue/superglue/data/v2/BoolQ.zip
      one JSON object a line: question, passage, idx, label (true / false)
  superglue/CB/{train,val}.jsonl      .../v2/CB.zip
      premise, hypothesis, label ('entailment' / 'contradiction' / 'neutral'), idx
  superglue/RTE/{train,val}.jsonl     .../v2/RTE.zip
      premise, hypothesis, label ('entailment' / 'not_entailment'), idx
  superglue/COPA/{train,val}.jsonl    .../v2/COPA.zip
      premise, choice1, choice2, question ('cause' / 'effect'), label (0 / 1), idx
  cnn_dailymail/cnn/stories/<sha1>.story         cnn_stories.tgz, https://cs.nyu.edu/~kcho/DMQA/
  cnn_dailymail/dailymail/stories/<sha1>.story   dailymail_stories.tgz, same page
  cnn_dailymail/url_lists/all_{train,val,test}.txt
      https://github.com/abisee/cnn-dailymail (directory url_lists): one URL a line

Unzip SuperGLUE's zips into `superglue/` (each holds a `BoolQ/`, `CB/`, ... directory) and
untar the story archives into `cnn_dailymail/` (they hold `cnn/stories/` and
`dailymail/stories/`). SuperGLUE's `test.jsonl` files have no labels and are not read (score
test predictions on the SuperGLUE server). A missing or incomplete tree raises
`official.ManualFilesMissingError`, naming each missing file, where to download it and the
expected tree; a `superglue/<config>` needs only its own task's files.

Templates (FLAN / T5 style; `{question}?` adds a '?' only when the question lacks one):

  squad_v1       inputs  "question: {question} context: {context}"
                 targets the first answer's text; references: every answer text
  boolq          inputs  "{passage} question: {question}? yes or no?"
                 targets "yes" / "no" (label true / false)
  cb             inputs  "premise: {premise} hypothesis: {hypothesis} does the premise
                          entail the hypothesis? yes, no, or maybe?"
                 targets entailment -> "yes", contradiction -> "no", neutral -> "maybe"
  rte            inputs  "premise: {premise} hypothesis: {hypothesis} does the premise
                          entail the hypothesis? yes or no?"
                 targets entailment -> "yes", not_entailment -> "no"
  copa           inputs  "premise: {premise} what was the {cause|effect}? option 1: {choice1}
                          option 2: {choice2}"
                 targets the text of the correct alternative (choice1 for label 0, else
                         choice2)
  cnn_dailymail  inputs  "summarize: {article}"
                 targets the highlights joined with " "

CNN / DailyMail: the split of a story is the URL list naming it; the story of URL `u` is
`hashlib.sha1(u.encode()).hexdigest() + ".story"`, found in either stories directory, and
examples follow the URL lists' order (a URL listed twice counts once). A .story file holds
the article's paragraphs, then the highlights, each as a line "@highlight", a blank line and
the highlight sentence. As TFDS's `cnn_dailymail` (version 3.4.0) does, lines are stripped,
a line not ending in one of . ! ? ... ' ` " ’ ” ) gets a "." appended (See et al.'s
original scripts, and TFDS before 3.2.0, appended " ." instead; ROUGE ignores the
difference), the text is kept cased, the article is its non-empty paragraphs joined by " ",
and stories with an empty article or no highlight are skipped (TFDS skips them too). TFDS
joins highlights with "\\n"; here they are joined with " ".

Generated data for CI-sized runs: `write_pydoc_task_files(manual_dir)` writes small files in
the official formats of squad_v1, superglue/boolq and cnn_dailymail from the text of Python's
help pages (`pydoc_data.topics`), so the tiny multitask run exercises these builders' code
path unchanged; see its docstring.

This module must stay importable on its own: grain worker processes re-import it.
"""
import dataclasses
import hashlib
import json
import os
import platform
import re

from etils import epath
import numpy as np
from pydoc_data import topics as pydoc_topics
import tensorflow_datasets as tfds

from metalm_jax.data import official
from metalm_jax.data import pydoc_corpus
from metalm_jax.data.official import ManualFile
from metalm_jax.data.official import ManualFilesMissingError  # noqa: F401  (re-exported)

SQUAD_HOME = "https://rajpurkar.github.io/SQuAD-explorer/"
SQUAD_DATA = "https://rajpurkar.github.io/SQuAD-explorer/dataset"
SUPERGLUE_HOME = "https://super.gluebenchmark.com/tasks"
SUPERGLUE_DATA = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2"
DMQA_HOME = "https://cs.nyu.edu/~kcho/DMQA/"
CNNDM_URL_LISTS = "https://raw.githubusercontent.com/abisee/cnn-dailymail/master/url_lists"
CNNDM_HOME = "https://github.com/abisee/cnn-dailymail"

SQUAD_TEMPLATE = "question: {question} context: {context}"
BOOLQ_TEMPLATE = "{passage} question: {question} yes or no?"  # {question} ends with '?'
CB_TEMPLATE = ("premise: {premise} hypothesis: {hypothesis} does the premise entail the "
               "hypothesis? yes, no, or maybe?")
RTE_TEMPLATE = ("premise: {premise} hypothesis: {hypothesis} does the premise entail the "
                "hypothesis? yes or no?")
COPA_TEMPLATE = ("premise: {premise} what was the {question}? option 1: {choice1} "
                 "option 2: {choice2}")
CNNDM_TEMPLATE = "summarize: {article}"

CB_LABELS = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
RTE_LABELS = {"entailment": "yes", "not_entailment": "no"}

# TFDS cnn_dailymail's END_TOKENS: a line ending in none of these gets a "." appended.
END_TOKENS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")


def text_features() -> tfds.features.FeaturesDict:
  """The features every text-to-text builder here writes."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "task": tfds.features.Text(),
      "inputs": tfds.features.Text(),
      "targets": tfds.features.Text(),
      "references": tfds.features.Sequence(tfds.features.Text()),
  })


def with_question_mark(question: str) -> str:
  """'is it' -> 'is it?'; a question that already ends with '?' is kept (stripped)."""
  question = question.strip()
  return question if question.endswith("?") else question + "?"


class TextTaskBuilder(official.OfficialBuilder, skip_registration=True):
  """Shared plumbing of the text builders: no image configs, the uniform text features."""

  BUILDER_CONFIGS = []  # text: OfficialBuilder's image configs do not apply
  HOMEPAGE = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=text_features(),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
    )


def _example(id_: str, task: str, inputs: str, targets: str,
             references: list[str] | None = None) -> dict:
  return {"id": id_, "task": task, "inputs": inputs, "targets": targets,
          "references": [targets] if references is None else references}


# TFDS ships builders named 'squad', 'super_glue' and 'cnn_dailymail' (imported lazily);
# registering a class of the same name would make one of the two imports fail. The builders
# here are reached through `datasets.DATASETS`, so none of them is registered with TFDS.

# ---------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------

SQUAD_SPLITS = {"train": "squad/train-v1.1.json", "validation": "squad/dev-v1.1.json"}


def squad_examples(data: dict, *, source: str = "SQuAD file") -> list[dict]:
  """The text-to-text examples of a parsed SQuAD v1.1 JSON file, in file order."""
  out = []
  for article in data["data"]:
    for paragraph in article["paragraphs"]:
      context = paragraph["context"].strip()
      for qa in paragraph["qas"]:
        answers = [a["text"] for a in qa["answers"]]
        if not answers:
          raise ValueError(f"{source}: question {qa['id']!r} has no answer (SQuAD v2.0 "
                           "file? squad_v1 reads SQuAD v1.1, where every question has one).")
        out.append(_example(
            qa["id"], "squad_v1",
            SQUAD_TEMPLATE.format(question=qa["question"].strip(), context=context),
            answers[0], answers))
  return out


class SquadV1(TextTaskBuilder, skip_registration=True):
  """SQuAD v1.1 (Rajpurkar et al., 2016): extractive QA on Wikipedia paragraphs.

  One example per question: inputs "question: {question} context: {context}", targets the
  first answer, references every answer (the dev set has several per question).
  Splits: train (train-v1.1.json), validation (dev-v1.1.json).
  """

  name = "squad_v1"
  HOMEPAGE = SQUAD_HOME
  REQUIRED = tuple(ManualFile(path, f"{SQUAD_DATA}/{path.split('/')[-1]} ({SQUAD_HOME})")
                   for path in SQUAD_SPLITS.values())

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager)
    return {split: self._generate_examples(manual_dir / path, path)
            for split, path in SQUAD_SPLITS.items()}

  def _generate_examples(self, path: epath.Path, relative: str):
    for ex in squad_examples(official.read_json(path), source=relative):
      yield ex["id"], ex


# ---------------------------------------------------------------------------------------
# SuperGLUE: BoolQ, CB, RTE, COPA
# ---------------------------------------------------------------------------------------

SUPERGLUE_FILES = {"train": "train.jsonl", "validation": "val.jsonl"}


@dataclasses.dataclass
class SuperGlueConfig(tfds.core.BuilderConfig):
  """One SuperGLUE task: `directory` is its folder in the official zip (e.g. 'BoolQ')."""
  directory: str = ""


def _label(labels: dict[str, str], row: dict, source: str) -> str:
  label = row.get("label")
  if label not in labels:
    raise ValueError(f"{source}: example idx={row.get('idx')!r} has label {label!r}; "
                     f"expected one of {sorted(labels)}.")
  return labels[label]


def superglue_example(task: str, row: dict, *, source: str = "SuperGLUE file") -> dict:
  """One row of a SuperGLUE task's jsonl file -> a text-to-text example."""
  id_ = str(row["idx"])
  if task == "boolq":
    if not isinstance(row.get("label"), bool):
      raise ValueError(f"{source}: example idx={row.get('idx')!r} has label "
                       f"{row.get('label')!r}; expected true or false.")
    return _example(id_, task, BOOLQ_TEMPLATE.format(
        passage=row["passage"].strip(), question=with_question_mark(row["question"])),
                    "yes" if row["label"] else "no")
  if task in ("cb", "rte"):
    template, labels = (CB_TEMPLATE, CB_LABELS) if task == "cb" else (RTE_TEMPLATE, RTE_LABELS)
    return _example(id_, task, template.format(premise=row["premise"].strip(),
                                               hypothesis=row["hypothesis"].strip()),
                    _label(labels, row, source))
  if task == "copa":
    if row.get("label") not in (0, 1) or isinstance(row.get("label"), bool):
      raise ValueError(f"{source}: example idx={row.get('idx')!r} has label "
                       f"{row.get('label')!r}; expected 0 or 1.")
    if row.get("question") not in ("cause", "effect"):
      raise ValueError(f"{source}: example idx={row.get('idx')!r} has question "
                       f"{row.get('question')!r}; expected 'cause' or 'effect'.")
    choices = (row["choice1"].strip(), row["choice2"].strip())
    return _example(id_, task, COPA_TEMPLATE.format(
        premise=row["premise"].strip(), question=row["question"], choice1=choices[0],
        choice2=choices[1]), choices[row["label"]])
  raise ValueError(f"Unknown SuperGLUE task {task!r}; known: boolq, cb, rte, copa.")


SUPERGLUE_CONFIGS = (
    SuperGlueConfig(name="boolq", directory="BoolQ",
                    description="BoolQ (Clark et al., 2019): yes/no questions on a passage."),
    SuperGlueConfig(name="cb", directory="CB",
                    description="CommitmentBank (de Marneffe et al., 2019): 3-way entailment."),
    SuperGlueConfig(name="rte", directory="RTE",
                    description="Recognizing Textual Entailment (RTE1-3, 5): 2-way."),
    SuperGlueConfig(name="copa", directory="COPA",
                    description="COPA (Roemmele et al., 2011): the more plausible cause or "
                    "effect of a premise."),
)


def _superglue_files(config: SuperGlueConfig) -> tuple[ManualFile, ...]:
  return tuple(
      ManualFile(f"superglue/{config.directory}/{name}",
                 f"{SUPERGLUE_DATA}/{config.directory}.zip (unzip into superglue/; "
                 f"{SUPERGLUE_HOME})")
      for name in SUPERGLUE_FILES.values())


class Superglue(TextTaskBuilder, skip_registration=True):
  """SuperGLUE v2 (Wang et al., 2019) tasks BoolQ, CB, RTE and COPA as text-to-text.

  Configs boolq, cb, rte, copa (`datasets.prepare("superglue/cb", ...)`); each reads only
  its own task's files. Splits: train (train.jsonl), validation (val.jsonl); test.jsonl has
  no labels and is not read. Targets: boolq yes/no; cb entailment/contradiction/neutral ->
  yes/no/maybe; rte entailment/not_entailment -> yes/no; copa the correct alternative.
  """

  name = "superglue"
  HOMEPAGE = SUPERGLUE_HOME
  BUILDER_CONFIGS = list(SUPERGLUE_CONFIGS)
  # Every config's files, for the instructions; an instance requires its config's only.
  REQUIRED = sum((_superglue_files(c) for c in SUPERGLUE_CONFIGS), ())

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.REQUIRED = _superglue_files(self.builder_config)

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager)
    directory = f"superglue/{self.builder_config.directory}"
    return {split: self._generate_examples(manual_dir / directory / name,
                                           f"{directory}/{name}")
            for split, name in SUPERGLUE_FILES.items()}

  def _generate_examples(self, path: epath.Path, relative: str):
    for row in official.read_json_lines(path):
      ex = superglue_example(self.builder_config.name, row, source=relative)
      yield ex["id"], ex


# ---------------------------------------------------------------------------------------
# CNN / DailyMail
# ---------------------------------------------------------------------------------------

CNNDM_SPLITS = {"train": "all_train.txt", "validation": "all_val.txt", "test": "all_test.txt"}
CNNDM_STORY_DIRS = ("cnn_dailymail/cnn/stories", "cnn_dailymail/dailymail/stories")


def story_filename(url: str) -> str:
  """The .story file of a URL in abisee/cnn-dailymail's lists: '<sha1 hex of url>.story'."""
  return hashlib.sha1(url.encode("utf-8")).hexdigest() + ".story"


def _fix_missing_period(line: str) -> str:
  if "@highlight" in line or not line or line.endswith(END_TOKENS):
    return line
  return line + "."


def parse_story(text: str) -> tuple[str, list[str]]:
  """A .story file's text -> (article, highlights), as TFDS cnn_dailymail 3.4.0 reads it.

  Lines are stripped and get a "." when they end in none of `END_TOKENS`; the article is
  the non-empty lines before the first "@highlight" joined by " "; every non-empty line
  after it that is not itself "@highlight" is a highlight.
  """
  article, highlights, in_highlights = [], [], False
  for line in text.splitlines():
    line = _fix_missing_period(line.strip())
    if not line:
      continue
    if line.startswith("@highlight"):
      in_highlights = True
    elif in_highlights:
      highlights.append(line)
    else:
      article.append(line)
  return " ".join(article), highlights


def read_url_list(path: epath.Path) -> list[str]:
  """The URLs of one of abisee/cnn-dailymail's url_lists files (blank lines and repeats
  dropped, order kept)."""
  return list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                            if line.strip()))


class CnnDailymail(TextTaskBuilder, skip_registration=True):
  """CNN / DailyMail (Hermann et al., 2015; See et al., 2017), non-anonymized stories.

  One example per story listed in abisee/cnn-dailymail's url_lists: inputs "summarize: " +
  the article, targets its highlights joined by " ". Splits: train (all_train.txt),
  validation (all_val.txt), test (all_test.txt); stories with an empty article or no
  highlight are skipped.
  """

  name = "cnn_dailymail"
  HOMEPAGE = CNNDM_HOME
  REQUIRED = (
      ManualFile("cnn_dailymail/cnn/stories/",
                 f"cnn_stories.tgz from {DMQA_HOME} ('Stories' of CNN; untar into "
                 "cnn_dailymail/)"),
      ManualFile("cnn_dailymail/dailymail/stories/",
                 f"dailymail_stories.tgz from {DMQA_HOME} ('Stories' of Daily Mail; untar "
                 "into cnn_dailymail/)"),
  ) + tuple(ManualFile(f"cnn_dailymail/url_lists/{name}", f"{CNNDM_URL_LISTS}/{name} "
                       f"({CNNDM_HOME}, directory url_lists)")
            for name in CNNDM_SPLITS.values())

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager)
    index = {}  # file name -> path, over both stories directories
    for directory in CNNDM_STORY_DIRS:
      with os.scandir(manual_dir / directory) as entries:
        for entry in entries:
          index.setdefault(entry.name, epath.Path(entry.path))
    out = {}
    for split, name in CNNDM_SPLITS.items():
      urls = read_url_list(manual_dir / "cnn_dailymail" / "url_lists" / name)
      missing = [u for u in urls if story_filename(u) not in index]
      if missing:
        shown = [f"cnn_dailymail/{{cnn,dailymail}}/stories/{story_filename(u)}  (for {u})"
                 for u in missing[:5]]
        raise ManualFilesMissingError(official.missing_message(
            type(self), manual_dir, shown,
            note=f"{len(missing)} stories listed in url_lists/{name} are missing (first "
            f"{len(shown)} listed)."))
      out[split] = self._generate_examples([index[story_filename(u)] for u in urls])
    return out

  def _generate_examples(self, paths: list[epath.Path]):
    for path in paths:
      article, highlights = parse_story(path.read_text(encoding="utf-8"))
      if not article or not highlights:
        continue
      id_ = path.name[:-len(".story")]
      target = " ".join(highlights)
      yield id_, _example(id_, "cnn_dailymail", CNNDM_TEMPLATE.format(article=article),
                          target)


BUILDERS: dict[str, type[TextTaskBuilder]] = {
    "squad_v1": SquadV1,
    "superglue": Superglue,
    "cnn_dailymail": CnnDailymail,
}


def instructions(name: str) -> str:
  """What to download for text dataset `name` (a key of `BUILDERS`) and where to put it."""
  return BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS


# ---------------------------------------------------------------------------------------
# Generated files in the official formats, from Python's help pages (CI-sized runs)
# ---------------------------------------------------------------------------------------

PYDOC_URL = "http://pydoc.local/{topic}/{n}"
PYDOC_MARKER = "GENERATED_FROM_PYDOC.json"  # in the manual dir: its files may be rewritten
PYDOC_MIN_WORDS = 16
PYDOC_MAX_WORDS = 40
PYDOC_TRAIN_PASSAGES = 320  # at most this many train passages (validation: all of them)
PYDOC_HIGHLIGHT_WORDS = 8

_WORD = re.compile(r"\w+")
_HEADING = re.compile(r"[*=\-~^+]{3,}")
_SENTENCE_END = re.compile(r"[.!?][\"')]*$")
_ABBREVIATION = re.compile(r"\(?(e\.g|i\.e|etc|vs|cf)\.", re.IGNORECASE)


def _prose_paragraphs(page: str) -> list[list[str]]:
  """The words of a help page's prose paragraphs: blocks separated by blank lines, minus
  any block with an indented line (code, grammar rules, tables, lists) or a heading rule;
  a final ':' (before a skipped code block) becomes '.'."""
  out = []
  for block in re.split(r"\n[ \t]*\n", page):
    lines = [line for line in block.split("\n") if line.strip()]
    if not lines or any(line[0].isspace() for line in lines):
      continue
    if any(_HEADING.fullmatch(line.strip()) for line in lines):
      continue
    words = " ".join(lines).split()
    if words[-1].endswith(":"):  # it introduced a code block (skipped): end it with "."
      words[-1] = words[-1][:-1] + "."
    out.append(words)
  return out


def _sentences(words: list[str]) -> list[list[str]]:
  out, current = [], []
  for word in words:
    current.append(word)
    if _SENTENCE_END.search(word) and not _ABBREVIATION.fullmatch(word):
      out.append(current)
      current = []
  if current:
    out.append(current)
  return out


def _passages(words: list[str]) -> list[list[str]]:
  """A paragraph -> passages of whole sentences, each PYDOC_MIN..MAX_WORDS words long (a
  longer sentence is cut into pieces); each passage is a list of sentence strings."""
  passages, current = [], []
  for sentence in _sentences(words):
    pieces = [sentence[i:i + PYDOC_MAX_WORDS] for i in range(0, len(sentence),
                                                             PYDOC_MAX_WORDS)]
    for piece in pieces:
      if current and sum(map(len, current)) + len(piece) > PYDOC_MAX_WORDS:
        passages.append(current)
        current = []
      current.append(piece)
  if current:
    passages.append(current)
  return [[" ".join(s) for s in p] for p in passages
          if sum(map(len, p)) >= PYDOC_MIN_WORDS]


def pydoc_passages(max_topics: int | None = None) -> dict[str, list[tuple[str, int, list[str]]]]:
  """split -> [(topic, n, sentences)]: the short prose passages of Python's help pages.

  A topic's passages go to `pydoc_corpus.split_of(topic)`; `n` numbers the passages of a
  topic. Help pages repeat paragraphs of one another, so a passage is kept once (its first
  occurrence, in sorted topic order), and a train passage whose text is also a validation
  passage is dropped. `max_topics`: at most this many topics per split (the first in
  sorted order).
  """
  out = {split: [] for split in pydoc_corpus.SPLITS}
  used = {split: 0 for split in pydoc_corpus.SPLITS}
  for topic in sorted(pydoc_topics.topics):
    split = pydoc_corpus.split_of(topic)
    if max_topics is not None and used[split] >= max_topics:
      continue
    used[split] += 1
    passages = [p for words in _prose_paragraphs(pydoc_topics.topics[topic])
                for p in _passages(words)]
    out[split] += [(topic, n, p) for n, p in enumerate(passages)]
  seen = set()
  for split in ("validation", "train"):
    kept = []
    for topic, n, sentences in out[split]:
      text = " ".join(sentences)
      if text not in seen:
        seen.add(text)
        kept.append((topic, n, sentences))
    out[split] = kept
  return out


# SQuAD's answer normalisation drops these: an answer made of one of them scores exact match
# 1 and F1 0 against anything that also normalises to nothing.
_ARTICLES = ("a", "an", "the")


def _squad_file(passages, *, dev: bool) -> tuple[dict, int]:
  """SQuAD v1.1 JSON: per passage, 'what is the first / last word of the passage?' (not asked
  where that word is an article, which SQuAD's normalisation would erase)."""
  articles, count = {}, 0
  for topic, n, sentences in passages:
    context = " ".join(sentences)
    words = list(_WORD.finditer(context))
    qas = []
    for which, match in (("first", words[0]), ("last", words[-1])):
      if match.group().lower() in _ARTICLES:
        continue
      answer = {"answer_start": match.start(), "text": match.group()}
      qas.append({
          "answers": [answer] * (3 if dev else 1),  # dev: 3 crowd answers, here agreeing
          "question": f"what is the {which} word of the passage?",
          "id": hashlib.sha1(f"{topic}/{n}/{which}".encode()).hexdigest()[:24],
      })
    count += len(qas)
    articles.setdefault(topic, []).append({"context": context, "qas": qas})
  return {"data": [{"title": t, "paragraphs": p} for t, p in articles.items()],
          "version": "1.1"}, count


def _boolq_rows(passages, rng: np.random.Generator) -> list[dict]:
  """BoolQ rows 'does the passage mention WORD': half true (WORD from the passage), half
  false (WORD from another passage of the split, absent from this one), in random order."""
  vocab = [sorted({w.lower() for w in _WORD.findall(" ".join(s))}) for _, _, s in passages]
  candidates = [[w for w in v if w.isalpha() and len(w) >= 4] for v in vocab]
  labels = rng.permutation(np.arange(len(passages)) % 2 == 0)
  rows = []
  for i, ((_, _, sentences), label) in enumerate(zip(passages, labels)):
    if label:
      pool = candidates[i] or vocab[i]
      word = pool[rng.integers(len(pool))]
    else:
      present = set(vocab[i])
      word = None
      for j in rng.permutation(len(passages)):
        absent = [w for w in candidates[j] if w not in present]
        if j != i and absent:
          word = absent[rng.integers(len(absent))]
          break
      if word is None:
        raise ValueError(f"No passage has a word absent from passage {i}; too few passages.")
    rows.append({"question": f"does the passage mention {word}",
                 "passage": " ".join(sentences), "idx": i, "label": bool(label)})
  return rows


def _story(sentences: list[str]) -> str:
  """.story text: one paragraph per sentence, then one highlight: the first sentence's first
  PYDOC_HIGHLIGHT_WORDS words (a lead summary, which copying solves)."""
  highlight = " ".join(sentences[0].split()[:PYDOC_HIGHLIGHT_WORDS]).rstrip(",;:")
  return "\n\n".join(sentences + ["@highlight", highlight]) + "\n"


def _write(path: epath.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


def write_pydoc_task_files(manual_dir, *, max_topics: int | None = None,
                           seed: int = 0) -> dict[str, dict[str, int]]:
  """Writes small squad_v1 / superglue boolq / cnn_dailymail files made from pydoc pages.

  The files are in the official formats and layout (see the module docstring), so
  `datasets.prepare("squad_v1", data_dir, manual_dir=manual_dir)` (and "superglue/boolq",
  "cnn_dailymail") build them with the same code as the real data. Built for CI-sized runs:
  the tasks test the code path and are learnable from the input alone by a tiny model.

  Passages: the prose paragraphs of `pydoc_data.topics` (code, grammar, lists and headings
  skipped), cut at sentence ends into passages of 16-40 words. A topic's passages are all
  in train or all in validation, by `pydoc_corpus.split_of(topic)`; a passage repeated on
  several pages is kept once, and never in train when a validation page has it. Train keeps
  a seeded random subset of at most 320 passages (in page order), validation keeps all
  (~50).

    squad/{train,dev}-v1.1.json       per passage: "what is the first word of the passage?"
                                      and "... last word ...", the answer being that word
                                      (a span of the context at its `answer_start`); dev
                                      questions carry 3 (identical) answers, as dev-v1.1 does
    superglue/BoolQ/{train,val}.jsonl per passage: "does the passage mention WORD", true
                                      (WORD from the passage) for exactly half of them in
                                      random order, else false (WORD from another passage
                                      of the split and absent from this one)
    cnn_dailymail/...                 per passage a story, one sentence a paragraph, with one
                                      highlight: the first sentence's first 8 words; URL
                                      http://pydoc.local/<topic>/<n>, story file named by its
                                      SHA-1 (alternately in cnn/ and dailymail/stories/).
                                      url_lists: all_train.txt the train passages;
                                      all_val.txt and all_test.txt both list the validation
                                      passages (there is no third held-out set)

  With Python 3.11.7 and no `max_topics`, the counts are: squad_v1 train 556 / validation
  86 (2 per passage, less the article answers), boolq 320 / 52, cnn_dailymail 320 / 52 / 52
  (SQuAD contexts: 16-40 words).

  Deterministic for a given `seed` and Python version (the pages come with the Python that
  runs it; 3.11 here): no global random state is used. To protect real downloads, files that
  already exist are overwritten only in a manual dir this function wrote before (it leaves
  `GENERATED_FROM_PYDOC.json` there).

  Args:
    manual_dir: the directory to write the tree into (created if needed).
    max_topics: if set, use at most this many help topics per split (for quick tests).
    seed: seeds the numpy Generator that picks train passages and BoolQ words / labels.

  Returns:
    Example counts, {"squad_v1": {"train": .., "validation": ..}, "boolq": {...},
    "cnn_dailymail": {"train": .., "validation": .., "test": ..}}: what the builders
    produce from these files.

  Raises:
    FileExistsError: a file to write exists in a manual dir this function did not write.
  """
  root = epath.Path(manual_dir)
  rng = np.random.default_rng(seed)
  passages = pydoc_passages(max_topics)
  train = passages["train"]
  if len(train) > PYDOC_TRAIN_PASSAGES:
    keep = np.sort(rng.choice(len(train), PYDOC_TRAIN_PASSAGES, replace=False))
    train = [train[i] for i in keep]
  passages = {"train": train, "validation": passages["validation"]}
  if not all(passages.values()):
    raise ValueError(f"No passages for split(s) {[s for s, p in passages.items() if not p]} "
                     f"with max_topics={max_topics}.")

  files: dict[str, str] = {}
  counts = {"squad_v1": {}, "boolq": {}, "cnn_dailymail": {}}
  for split, squad_path in SQUAD_SPLITS.items():
    data, counts["squad_v1"][split] = _squad_file(passages[split], dev=split == "validation")
    files[squad_path] = json.dumps(data)
  for split, name in SUPERGLUE_FILES.items():
    rows = _boolq_rows(passages[split], rng)
    files[f"superglue/BoolQ/{name}"] = "".join(json.dumps(r) + "\n" for r in rows)
    counts["boolq"][split] = len(rows)
  story_split = {"train": "train", "validation": "validation", "test": "validation"}
  k = 0
  for split, name in CNNDM_SPLITS.items():
    urls = []
    for topic, n, sentences in passages[story_split[split]]:
      url = PYDOC_URL.format(topic=topic, n=n)
      urls.append(url)
      if split != "test":  # the test list reuses the validation stories
        files[f"{CNNDM_STORY_DIRS[k % 2]}/{story_filename(url)}"] = _story(sentences)
        k += 1
    files[f"cnn_dailymail/url_lists/{name}"] = "".join(u + "\n" for u in urls)
    counts["cnn_dailymail"][split] = len(urls)

  marker = root / PYDOC_MARKER
  if not marker.exists():
    clashes = [path for path in files if (root / path).exists()]
    if clashes:
      raise FileExistsError(
          f"{root / clashes[0]} (and {len(clashes) - 1} more file(s)) already exist in "
          f"{os.fspath(root)!r}, which write_pydoc_task_files did not write (no "
          f"{PYDOC_MARKER}); not overwriting what may be the real data. Use another dir.")
  for path, text in files.items():
    _write(root / path, text)
  _write(marker, json.dumps({"python": platform.python_version(), "seed": seed,
                             "max_topics": max_topics, "counts": counts}, indent=1) + "\n")
  return counts
