"""The command lines: user errors print the message and exit 1 without a traceback (bugs keep
theirs), third-party INFO stays quiet, and experiments/generate.py samples a checkpoint."""
import logging
import os
import subprocess
import sys

import pytest

from metalm_jax import cli
from metalm_jax import generation
from metalm_jax.config import ConfigError
from metalm_jax.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=240):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_user_errors_exit_1_with_the_message_and_bugs_keep_their_traceback(capsys):
  for error in (ConfigError("config.model.d_model=3 does not divide ..."),
                datasets.DatasetNotPreparedError("Dataset 'x' is not prepared ...")):
    with pytest.raises(SystemExit) as e:
      with cli.user_errors("train.py"):
        raise error
    assert e.value.code == 1
    assert f"train.py: {type(error).__name__}: {error}" in capsys.readouterr().err
  with pytest.raises(ZeroDivisionError):  # a bug is not a user error
    with cli.user_errors("train.py"):
      1 / 0  # noqa: B018


def test_a_dataset_not_prepared_is_one_clear_line_not_a_traceback(tmp_path):
  out = _run("train.py", "--config=" + os.path.join(ROOT, "configs", "metalm_vl.py"),
             f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'empty'}")
  assert out.returncode == 1, out.stderr[-2000:]
  assert "train.py: DatasetNotPreparedError" in out.stderr
  assert "prepare_data.py --dataset=digits_vl" in out.stderr
  assert "Traceback" not in out.stderr


def test_third_party_info_is_quiet_unless_asked():
  cli.setup_logging(verbosity=0)
  assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
  assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
  assert logging.getLogger("metalm_jax.train.trainer").isEnabledFor(logging.INFO)
  cli.setup_logging(verbosity=1)
  assert logging.getLogger("absl").isEnabledFor(logging.INFO)
  cli.setup_logging(verbosity=0)


def test_prepare_data_keeps_third_party_info_quiet(tmp_path):
  out = _run("prepare_data.py", "--dataset=digits_vl", f"--data_dir={tmp_path}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Dataset 'digits_vl' is in" in out.stdout
  # TFDS logs its writer and dataset-info INFO lines through absl unless --verbosity asks.
  assert "writer.py" not in out.stderr and "dataset_info.py" not in out.stderr, out.stderr[-2000:]


def test_generate_greedy_sampled_and_beam(uninterrupted, tmp_path):
  workdir, config, result = uninterrupted
  loaded = generation.load(config, workdir)
  greedy = generation.generate(loaded, ["The ", "A"], generation.Decoding(max_new_tokens=4))
  assert len(greedy) == 2
  # The trainer's own end-of-run sample is the same greedy continuation.
  assert "The " + greedy[0] == result["sample"][:len("The ") + len(greedy[0])]
  again = generation.generate(loaded, ["The "], generation.Decoding(max_new_tokens=4))
  assert again[0] == greedy[0]
  sampled = [generation.generate(loaded, ["The "], generation.Decoding(
      max_new_tokens=4, temperature=1.0, seed=s))[0] for s in range(4)]
  assert len(set(sampled)) > 1  # different seeds, different samples
  beam = generation.generate(loaded, ["The "], generation.Decoding(max_new_tokens=4,
                                                                   beam_size=3))
  assert isinstance(beam[0], str)
  with pytest.raises(ValueError, match="reads text only"):
    generation.generate(loaded, ["x"], image=object())
  with pytest.raises(ValueError, match="beam search .* is deterministic"):
    generation.Decoding(beam_size=2, temperature=0.5)


def test_generate_command_line(uninterrupted, tmp_path):
  workdir, config, _ = uninterrupted
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The \nIn\n")
  out = _run("generate.py", "--config=" + os.path.join(ROOT, "configs", "decoder_lm.py")
             + ":size=test", f"--config.data.data_dir={config.data.data_dir}",
             f"--checkpoint={workdir}", f"--prompt_file={prompts}", "--max_new_tokens=3")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count(" -> ") == 2 and "'In' -> " in out.stdout
  assert "checkpoint_manager.py" not in out.stderr  # orbax's INFO lines stay quiet
