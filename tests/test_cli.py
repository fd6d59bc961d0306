"""The `dgbench` command end to end, in subprocesses: training, plugins, user-error messages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image

from dgbench.records import read_records, without_timing

pytestmark = pytest.mark.slow


def _dgbench(args, tmp_path, data_root, env=None, **kwargs):
    command = [sys.executable, "-m", "dgbench.cli", *args]
    if args and args[0] == "train":
        command += [f"output_dir={tmp_path / 'outputs'}", "trainer.progress=false"]
        if not any(a.startswith("dataset.root=") for a in args):
            command.append(f"dataset.root={data_root}")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300, **kwargs)


def _assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dgbench: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_prints_per_domain_accuracies(tmp_path, data_root):
    result = _dgbench(["train", "trainer.steps=3", "trainer.checkpoint_freq=2"], tmp_path, data_root)
    assert result.returncode == 0, result.stderr
    assert "domain" in result.stdout and "test" in result.stdout and "train" in result.stdout
    (results,) = (tmp_path / "outputs" / "default").glob("*/results.jsonl")
    records = read_records(results)
    assert [r["step"] for r in records] == [0, 2]
    assert list(records[-1]["acc"]) == ["photo", "painting", "cartoon", "sketch"]  # dataset order kept
    again = _dgbench(["train", "trainer.steps=3", "trainer.checkpoint_freq=2"], tmp_path, data_root)
    assert again.returncode == 0 and "run already done" in again.stdout
    for output in (result.stdout, again.stdout):  # test_envs=[0] is photo; roles follow domain order
        roles = {line.split()[0]: line.split()[1] for line in output.splitlines() if "%" in line}
        assert roles == {"photo": "test", "painting": "train", "cartoon": "train", "sketch": "train"}


def test_list_shows_components_with_hparams_and_search_spaces(tmp_path, data_root):
    result = _dgbench(["list"], tmp_path, data_root)
    assert result.returncode == 0, result.stderr
    assert "erm  (algorithm=erm)" in result.stdout
    assert "algorithm.lr=5e-05   search: 10^U(-5, -3.5)" in result.stdout
    assert "embedded" in result.stdout and "small_cnn" in result.stdout and "timm" in result.stdout


def test_plugin_algorithm_from_outside_the_package_trains(tmp_path, data_root):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "toy_plugin.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            import torch.nn.functional as F

            from dgbench.algorithms import Algorithm, AlgorithmHParams
            from dgbench.hparams import Uniform, hparam
            from dgbench.registry import ALGORITHMS


            @dataclass(kw_only=True)
            class ToyHParams(AlgorithmHParams):
                smoothing: float = hparam(0.1, Uniform(0.0, 0.2))


            @ALGORITHMS.register("toy", ToyHParams)
            class Toy(Algorithm):
                def __init__(self, backbone, num_classes, num_domains, cfg):
                    super().__init__(backbone, num_classes, num_domains, cfg)
                    self.optimizer = self.make_optimizer()

                def update(self, batches):
                    losses = [F.cross_entropy(self.predict(x), y, label_smoothing=self.cfg.smoothing)
                              for x, y in batches]
                    loss = sum(losses) / len(losses)
                    self.optimizer.zero_grad()
                    loss.backward()
                    self.optimizer.step()
                    return {"loss": loss.item(), "worst": max(l.item() for l in losses)}
            """
        )
    )
    env = {"DGBENCH_PLUGINS": "toy_plugin", "PYTHONPATH": str(plugin_dir)}
    args = [
        "train",
        "algorithm=toy",
        "algorithm.smoothing=0.05",
        "trainer.steps=3",
        "trainer.checkpoint_freq=2",
    ]
    result = _dgbench(args, tmp_path, data_root, env=env)
    assert result.returncode == 0, result.stderr
    (results,) = (tmp_path / "outputs" / "default").glob("*/results.jsonl")
    final = read_records(results)[-1]
    assert final["algorithm"] == "toy" and final["step"] == 2
    assert final["hparams"]["smoothing"] == 0.05 and "worst" in final["metrics"]
    listing = _dgbench(["list", "algorithms"], tmp_path, data_root, env=env)
    assert "toy  (algorithm=toy)" in listing.stdout

    missing = _dgbench(["list"], tmp_path, data_root, env={"DGBENCH_PLUGINS": "no_such_plugin"})
    _assert_one_line_error(missing, "DGBENCH_PLUGINS", "no_such_plugin")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("algorithm=nope", ["algorithm/nope", "erm"]),
        ("algorithm.nope=1", ["nope"]),
        ("algorithm.lr=fast", ["algorithm.lr", "fast"]),
        ("trainer.device=tpu", ["trainer.device", "tpu"]),
    ],
)
def test_config_errors_name_the_key_without_traceback(tmp_path, data_root, override, fragments):
    result = _dgbench(["train", override], tmp_path, data_root)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_missing_data_root_and_unknown_backbone_are_one_line_errors(tmp_path, data_root):
    missing = _dgbench(["train", "dataset=pacs", f"dataset.root={tmp_path / 'nowhere'}"], tmp_path, data_root)
    _assert_one_line_error(missing, str(tmp_path / "nowhere"), "dgbench data download pacs")
    unknown = _dgbench(["train", "backbone=timm", "backbone.name=resnet5O"], tmp_path, data_root)
    _assert_one_line_error(unknown, "backbone.name", "resnet50")


def test_unreadable_image_names_the_file(tmp_path, data_root):
    root = tmp_path / "fake"
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    for domain in domains:
        for label, cls in enumerate(classes):
            folder = root / "PACS" / domain / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (label * 30, i * 50, 0)).save(folder / f"img_{i}.png")
    broken = root / "PACS" / "photo" / "dog" / "img_1.png"
    broken.write_bytes(b"this is not a png")
    args = [
        "train",
        "dataset=pacs",
        f"dataset.root={root}",
        "dataset.test_envs=[photo]",
        "data.resolution=16",
        "trainer.steps=2",
        "algorithm.batch_size=4",
    ]
    result = _dgbench(args, tmp_path, data_root)
    _assert_one_line_error(result, str(broken))


def test_sigkill_mid_run_then_relaunch_matches_uninterrupted_run(tmp_path, data_root):
    args = ["train", "trainer.steps=300", "trainer.checkpoint_freq=50", "algorithm.batch_size=8"]
    reference = _dgbench([*args, "name=reference"], tmp_path, data_root)
    assert reference.returncode == 0, reference.stderr
    (reference_results,) = (tmp_path / "outputs" / "reference").glob("*/results.jsonl")

    command = [
        sys.executable,
        "-m",
        "dgbench.cli",
        *args,
        "name=killed",
        f"output_dir={tmp_path / 'outputs'}",
        f"dataset.root={data_root}",
        "trainer.progress=false",
    ]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed_dir = tmp_path / "outputs" / "killed"
    while time.time() < deadline:  # kill once a few records (and checkpoints) exist
        found = list(killed_dir.glob("*/results.jsonl"))
        if found and len(read_records(found[0])) >= 3:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (killed_results,) = killed_dir.glob("*/results.jsonl")
    assert not (killed_results.parent / "done").exists()

    relaunched = _dgbench([*args, "name=killed"], tmp_path, data_root)
    assert relaunched.returncode == 0, relaunched.stderr
    expected, got = read_records(reference_results), read_records(killed_results)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert [without_timing(r) for r in got] == [without_timing(r) for r in expected]
