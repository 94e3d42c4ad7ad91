"""A user's first run, as a new user has it: no RAY_AUTH_* settings, no ~/.ray/auth_token.

Every line printed is the project's own; no library banner or warning that the user can do
nothing about, and Ray's token authentication is still on.
"""
import os
import re
import subprocess
import sys

import pytest

# Each line the pipeline prints, after Ray's "(RayTrainWorker pid=N)" prefix.
OWN_LINES = ("worker threads pinned: ", "MNIST from ", "model lenet5: ", "step ", "epoch 1/1: ", "best epoch 1: ",
             "time: ", "best checkpoint: ", "run directory: ", "exporting lenet5 from ", "converted to ONNX ",
             "quantized to int8 ", "verifying on all 10000 test images", "  TensorFlow: ", "  ONNX Runtime model",
             "  timing model", "fp32: accuracy ", "int8: accuracy ", "verified export written to ", '{"best_epoch"')


@pytest.mark.slow  # trains, starts Ray or exports
def test_a_first_pipeline_prints_only_its_own_lines_with_token_auth_on(tmp_path, mnist_dir):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "pipeline", "--preset", "smoke", "--epochs", "1",
                           "--name", "first", "--max-int8-drop", "5"],  # a 1-epoch smoke net is too weak for 0.1 pp
                          capture_output=True, text=True, cwd=tmp_path, env={**env, "HOME": str(home)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [re.sub(r"^\(\w+ pid=\d+\) ", "", re.sub(r"\x1b\[[0-9;]*m", "", line))
             for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    strangers = [line for line in lines if not line.startswith(OWN_LINES)]
    assert not strangers, "lines that are not the project's own:\n" + "\n".join(strangers)
    assert any(line.startswith("verified export written to ") for line in lines)
    # Ray made the run's token itself, as it does for any new local Ray with authentication on.
    assert (home / ".ray" / "auth_token").is_file()
