"""The repository stands alone: no README, doc, docstring or notebook sends readers outside it
to the design notes it grew from (issue 21). The methods live in docs/papers.md."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCHED = ("README.md", "Makefile", "setup.py", "docs", "metalm_jax", "configs", "experiments",
            "notebooks", "tests")
TEXT = (".py", ".md", ".ipynb", ".txt", ".cfg", ".ini", ".toml", "Makefile")
# Built from parts so that this file does not match itself.
OUTSIDE = re.compile(re.escape("../" + "shared") + "|" + re.escape("shared/" + "design") +
                     r"|\bPAPERS\.md")


def _files():
  for entry in SEARCHED:
    path = os.path.join(ROOT, entry)
    if os.path.isfile(path):
      yield path
    for folder, dirs, names in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
      for name in names:
        if name.endswith(TEXT):
          yield os.path.join(folder, name)


def test_no_pointer_outside_the_repository():
  hits = []
  for path in _files():
    with open(path, encoding="utf-8", errors="replace") as f:
      for number, line in enumerate(f, 1):
        if OUTSIDE.search(line):
          hits.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
  assert not hits, ("these lines point outside the repository; point them at docs/papers.md "
                    "(or another page under docs/) instead:\n" + "\n".join(hits))


def test_readme_points_at_the_papers_page():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    assert "docs/papers.md" in f.read()
  with open(os.path.join(ROOT, "docs", "papers.md"), encoding="utf-8") as f:
    papers = f.read()
  for reference in ("arXiv:2206.06336", "arXiv:2205.12005", "arXiv:2411.08840",
                    "arXiv:2312.00752", "arXiv:2405.21060", "arXiv:2107.07651",
                    "arXiv:2306.14824"):
    assert reference in papers, reference
