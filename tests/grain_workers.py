"""Resume checks of grain pipelines that run worker processes.

grain's workers need absl flags parsed and importable code, so the check runs as a script:
`assert_workers_resume(tmp_path, imports, dataset)` writes one that builds `dataset` (a Python
expression over `imports`), reads `skip` batches, saves the iterator state, reads `take`
more, and checks that a fresh iterator restored from the state gives the same `take` batches.
"""
import subprocess
import sys

_SCRIPT = """
from absl import app
import numpy as np
{imports}

def main(_):
  ds = {dataset}
  it = iter(ds)
  for _ in range({skip}):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range({take})]
  it.close()
  resumed = iter(ds)
  resumed.set_state(state)
  got = [next(resumed) for _ in range({take})]
  resumed.close()
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, expected) for k in a)
  print("OK")

if __name__ == "__main__":
  app.run(main)
"""


def assert_workers_resume(tmp_path, imports: str, dataset: str, *, skip: int, take: int):
  script = tmp_path / "workers.py"
  script.write_text(_SCRIPT.format(imports=imports, dataset=dataset, skip=skip, take=take))
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
