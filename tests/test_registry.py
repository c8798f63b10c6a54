"""The method registry: built-in names, errors, and a user's method run from the CLI with --import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import methods
from benchmarks.cli import main
from benchmarks.errors import ConfigError, UnknownMethodError
from benchmarks.records import metric_value, read_record, same_run_records
from methods import available_methods, get_method, import_user_module, register_method
from methods.base import SSLMethod

REPO = Path(__file__).resolve().parent.parent

USER_MODULE = '''
"""A user's own method, in a file of its own: registered by importing it."""

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods import register_method
from methods.base import MethodHparams, SSLMethod


@register_method("user_cosine")
class UserCosine(SSLMethod):
    display_name = "User cosine"

    class Hparams(MethodHparams):
        dim: int = Field(16, gt=0)
        scale: float = 1.0

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        self.head = nn.Linear(backbone.feature_dim, self.hparams.dim)

    def training_loss(self, batch):
        z_a, z_b = (F.normalize(self.head(self.backbone(v)), dim=1) for v in batch.views[:2])
        loss = self.hparams.scale * (2 - 2 * (z_a * z_b).sum(dim=1).mean())
        return loss, {}

    def on_train_epoch_start(self, ctx):
        return {"user_hook_epoch": ctx.epoch + 1, "user_scale": self.hparams.scale}
'''


@pytest.fixture
def clean_registry():
    before = dict(methods._REGISTRY)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(before)


def test_builtin_methods_are_registered_under_their_names():
    for name in ("simclr", "byol", "swav", "random_init", "supervised"):
        cls = get_method(name)
        assert issubclass(cls, SSLMethod) and cls.name == name
    assert available_methods() == sorted(available_methods())


def test_unknown_name_lists_the_available_ones_and_how_to_import():
    with pytest.raises(UnknownMethodError) as info:
        get_method("simclrr")
    message = str(info.value)
    assert message.startswith("unknown method 'simclrr'; available: ")
    assert all(name in message for name in available_methods()) and "--import" in message


def test_register_refuses_bad_names_and_silent_replacement(clean_registry):
    with pytest.raises(ValueError, match="letters, digits and '_'"):
        register_method("my-method")
    with pytest.raises(ValueError, match="'simclr' is already registered by methods.simclr.SimCLR"):
        @register_method("simclr")
        class Impostor(SSLMethod):
            pass


def test_import_user_module_errors(tmp_path):
    with pytest.raises(ConfigError, match="--import: no such file"):
        import_user_module(str(tmp_path / "absent.py"))
    with pytest.raises(ConfigError, match="--import: cannot import module 'no_such_pkg.mod'"):
        import_user_module("no_such_pkg.mod")


def test_user_module_registers_on_import(tmp_path, clean_registry):
    module = tmp_path / "my_methods.py"
    module.write_text(USER_MODULE)
    import_user_module(str(module))
    cls = get_method("user_cosine")
    assert cls.display_name == "User cosine" and cls.__module__ == "ssl_bench_user_my_methods"


def test_cli_lists_a_user_method_only_once_imported(tmp_path, capsys, clean_registry):
    module = tmp_path / "my_methods.py"
    module.write_text(USER_MODULE)
    assert main(["run", "--suite", "digits", "--methods", "user_cosine", "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "work"), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'user_cosine'" in err and "--import" in err
    assert main(["list", "--import", str(module)]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["user_cosine", "User", "cosine"] in listed and ["simclr", "SimCLR"] in listed


@pytest.mark.slow
def test_user_method_runs_from_the_cli_by_name(tmp_path):
    module = tmp_path / "my_methods.py"
    module.write_text(USER_MODULE)
    out, work = tmp_path / "out", tmp_path / "work"
    base = [sys.executable, "-m", "benchmarks"]
    run = subprocess.run(
        [*base, "run", "--suite", "digits", "--import", str(module), "--methods", "user_cosine", "--epochs", "1", "--seeds", "0",
         "--no-references", "--out", str(out), "--work-dir", str(work), "--no-report", "--no-progress",
         "--set", "methods.user_cosine.dim=8", "methods.user_cosine.scale=0.25", "dataset.options.test_fraction=0.75", "evaluation.protocols=[knn]"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (path,) = same_run_records(out, "digits", "user_cosine", 1, 0)
    record = read_record(path)
    assert record["method"] == "user_cosine" and record["method_display"] == "User cosine"
    assert record["status"] == "completed" and not record["is_reference"]
    assert record["method_config"]["hparams"] == {"dim": 8, "scale": 0.25}  # the --set overrides
    (entry,) = record["history"]
    # the user's epoch hook ran, and the loss is the user's: scale * (2 - 2 cos) lies in [0, 4 * 0.25]
    assert entry["user_hook_epoch"] == 1 and entry["user_scale"] == 0.25
    assert 0 <= entry["loss"] <= 1.0
    assert 0 <= metric_value(record, "knn", "top1", k=20) <= 100
    # the run folder is named by the run and its training fingerprint
    assert [p.name for p in (work / "digits").glob("user_cosine_e1_s0*/model.pt")] == ["model.pt"]


def test_the_readme_example_method_registers_validates_and_trains(tmp_path, clean_registry):
    """The code block of README.md's "Adding a method" section, run as written."""
    import torch

    from methods.base import DataInfo, TrainBatch

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Adding a method"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    module = tmp_path / "readme_method.py"
    module.write_text(code, encoding="utf-8")
    import_user_module(str(module))
    cls = get_method("my_method")
    assert cls.display_name == "My method"
    with pytest.raises(ConfigError, match="temperature"):
        cls.resolve_hparams({"temperature": -1}, "methods.my_method")
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    backbone.feature_dim = 8
    method = cls(backbone, DataInfo(num_classes=10, num_train=4, in_channels=1, image_size=8),
                 cls.resolve_hparams({"temperature": 0.5}, "methods.my_method"))
    views = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    loss, logs = method.training_loss(TrainBatch(views, torch.arange(4), None, 1, 0, 1, torch.Generator()))
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 4 / 0.5 and logs == {}
