"""train.py end to end on the tiny model, and one-line errors for bad input."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402


def run_train(*args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_two_epoch_run_on_tiny_model(tmp_path):
    result = run_train("--config", "configs/tiny.toml", "--config", "tests/fast.toml", "--run_dir", str(tmp_path / "run"), "--num_epochs", "2", "--log_with", "tensorboard")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [l for l in result.stdout.splitlines() + result.stderr.splitlines() if re.search(r"epoch +\d+ \| reward", l)]
    assert len(lines) == 2, result.stdout[-2000:]
    for line in lines:
        mean, std = re.search(r"reward ([-+\d.e]+) ± ([-+\d.e]+)", line).groups()
        assert float(mean) == float(mean) and abs(float(mean)) < 1e6 and float(std) >= 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--model", "/nonexistent/sd"], r"/nonexistent/sd.*--model tiny"),
        (["--config", "configs/tiny.toml", "sample.batch_size=0"], r"sample.batch_size must be positive"),
        (["--config", "configs/tiny.toml", "train.batch_size=-4"], r"train.batch_size must be positive"),
        (["--config", "configs/tiny.toml", "train.lr=1"], r"unknown config key 'train.lr'; valid keys: train.learning_rate"),
        (["--config", "configs/tiny.toml", "sample.num_steps=ten"], r"sample.num_steps must be int"),
        (["--config", "configs/tiny.toml", "--prompts", "EMPTY"], r"holds no prompts"),
        (["--config", "configs/tiny.toml", "--prompts", "/no/such/prompts.txt"], r"neither a built-in set"),
        (["--config", "/no/such/config.toml"], r"config file not found"),
        (["--config", "configs/tiny.toml", "model_options.remat=all"], r"model_options.remat='all' is not one of: none, blocks, dots"),
        (["--config", "configs/tiny.toml", "model_options.attention=flash"], r"model_options.attention='flash' is not one of: auto, xla, cudnn, chunked"),
        (["--config", "configs/tiny.toml", "model_options.frozen_dtype=float16"], r"model_options.frozen_dtype='float16' is not one of: float32, bfloat16"),
        (["--config", "configs/tiny.toml", "parallel.fsdp=maybe"], r"parallel.fsdp must be bool"),
        # REINFORCE without a ratio is biased off-policy: refused (issue 15).
        (["--config", "configs/tiny.toml", "--algorithm", "herd", "train.estimator=sf"], r"train.estimator=sf is biased with herd \(replayed"),
        (["--config", "configs/tiny.toml", "--algorithm", "ddpg", "train.estimator=sf"], r"train.estimator=sf is biased with ddpg"),
        (["--config", "configs/tiny.toml", "--algorithm", "ddpo", "train.estimator=sf", "train.num_inner_epochs=2"], r"biased with train.num_inner_epochs=2"),
        (["--config", "configs/tiny.toml", "--algorithm", "ddpo", "train.estimator=sf", "sample.num_batches_per_epoch=2"], r"biased with \d+ minibatches per epoch"),
        (["--config", "configs/tiny.toml", "--algorithm", "ddpg", "ddpg.rho_bar=0"], r"ddpg.rho_bar must be > 0"),
        (["--config", "configs/tiny.toml", "--algorithm", "ddpg", "ddpg.correction=vtrace"], r"ddpg.correction='vtrace' is not one of: ratio, truncated, weighted"),
        (["--config", "configs/tiny.toml", "--reward_model", "color_success", "reward.success_threshold=1.5"], r"reward.success_threshold must be in \[0, 1\), got 1.5"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, argv, pattern):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv] + ["--run_dir", str(tmp_path / "run"), "--log_with", "none"]
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--algorithm", "--reward_model", "--log_with"])
def test_unknown_choice_is_one_line(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag, "nope"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and "invalid choice: 'nope'" in err, err


def test_process_exit_code_and_no_traceback_without_model(tmp_path):
    """Plain `python train.py` offline, without a local model: one line that says how to run tiny."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--run_dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "--model tiny" in err[0] and "Traceback" not in result.stderr, result.stderr
