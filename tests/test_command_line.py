"""The command line itself (issue 24): flags win over the method sections' budgets, --help is fast and lists
the protocols, and a run's first lines say what the command line overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import PROTOCOL_NAMES, build_parser, cli_overrides, main
from benchmarks.cli_common import deep_update, parse_set
from benchmarks.config import load_suite
from benchmarks.evaluation.settings import PROTOCOLS
from benchmarks.records import same_run_records

REPO = Path(__file__).resolve().parent.parent


def resolved(argv: list[str]):
    """The config `run` builds from `argv` (the same merge as cmd_run)."""
    args = build_parser(with_evaluate=False).parse_args(["run", *argv])
    return load_suite(args.suite, deep_update(parse_set(args.set), cli_overrides(args)))


def test_epochs_and_batch_size_win_over_every_method_section():
    # cifar10's self_classifier/reimpl section says train: {batch_size: 512, epochs: 800}
    assert resolved(["--suite", "cifar10"]).method("self_classifier/reimpl").epochs == 800
    config = resolved(["--suite", "cifar10", "--methods", "simclr", "self_classifier", "self_classifier/reimpl",
                       "--epochs", "10", "--batch-size", "64"])
    for name in ("simclr", "self_classifier", "self_classifier/reimpl", "carl"):
        assert (config.method(name).epochs, config.method(name).batch_size) == (10, 64), name
    # --set of a section's budget is a section's value too: the flag wins over it
    config = resolved(["--suite", "digits", "--epochs", "3", "--set", "methods.simclr/long.train.epochs=50"])
    assert config.method("simclr/long").epochs == 3
    # without the flag, the section's budget is its default
    assert resolved(["--suite", "digits", "--set", "methods.simclr/long.train.epochs=50"]
                    ).method("simclr/long").epochs == 50


def test_the_issue_case_trains_every_method_for_the_given_epochs(tmp_path, capsys, monkeypatch):
    """`run --suite cifar10 --methods simclr self_classifier self_classifier/reimpl --epochs 10`: reimpl trains
    10 epochs, not its section's 800 (run_one is replaced: what it is asked to train is the point)."""
    import benchmarks.runner

    try:
        from tests import fixtures
    except ImportError:
        import fixtures

    asked = {}

    def fake_run_one(config, name, seed, *args, **kwargs):
        asked[name] = (config.method(name).epochs, config.method(name).batch_size)
        return {"status": "completed", "metrics": {}}

    monkeypatch.setattr(benchmarks.runner, "run_one", fake_run_one)
    root = fixtures.make_cifar10(tmp_path / "data")
    assert main(["run", "--suite", "cifar10", "--methods", "simclr", "self_classifier", "self_classifier/reimpl",
                 "--epochs", "10", "--batch-size", "16", "--seeds", "0", "--no-references", "--no-report",
                 "--data-root", str(root), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                 "--set", "evaluation.protocols=[knn]", "evaluation.knn.ks=[5]"]) == 0
    assert asked == {name: (10, 16) for name in ("simclr", "self_classifier", "self_classifier/reimpl")}
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["note: --epochs 10 replaces methods.self_classifier/reimpl.train.epochs (800) for "
                         "self_classifier/reimpl",
                         "note: --batch-size 16 replaces methods.self_classifier/reimpl.train.batch_size (512) for "
                         "self_classifier/reimpl"]
    assert "self_classifier/reimpl seed 0: pretraining 10 epochs" in "\n".join(lines)


@pytest.mark.slow
def test_the_first_lines_of_a_run_say_which_section_budget_the_command_line_replaces(tmp_path, capsys):
    assert main(["run", "--suite", "digits", "--methods", "simclr/long", "--epochs", "1", "--seeds", "0",
                 "--no-references", "--no-report", "--no-progress", "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "work"), "--set", "methods.simclr/long.train.epochs=50",
                 "evaluation.protocols=[knn]", "train.online_knn_every=0", "dataset.options.test_fraction=0.75"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "note: --epochs 1 replaces methods.simclr/long.train.epochs (50) for simclr/long"
    assert "simclr/long seed 0: pretraining 1 epochs" in lines[1]
    # then the step count, and once the first steps are done, the time they imply
    assert lines[2].strip().startswith("3 steps per epoch x 1 epoch(s) to go (batch size 128)")
    assert " s/step over the first 3 step(s): about " in lines[3] and "per epoch" in lines[3]
    (record,) = same_run_records(tmp_path / "out", "digits", "simclr/long", 1, 0)
    assert record.exists()


def test_run_help_lists_the_protocols(capsys):
    assert PROTOCOL_NAMES == PROTOCOLS  # the static list --help shows is the validated one
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"evaluation protocols: {', '.join(PROTOCOLS)}" in text


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["evaluate", "--help"], ["config", "--help"]])
def test_help_imports_neither_torch_nor_lightning(argv):
    """--help answers in well under a second because it imports no heavy library (README: measured figure)."""
    code = (f"import sys\nfrom benchmarks.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


def test_the_progress_bar_refreshes_on_time_while_a_step_runs(capsys):
    """No step ends during the wait, yet the bar is redrawn (its elapsed time moves) every `interval` seconds."""
    import time

    from benchmarks.training import TimedProgressBar

    bar = TimedProgressBar(refresh_rate=50, interval=0.1)
    bar.on_train_start()
    bar.train_progress_bar.reset(total=19)
    capsys.readouterr()
    time.sleep(0.65)
    redraws = capsys.readouterr().out.count("\r")
    bar.on_train_end()
    assert redraws >= 3, redraws
    bar._should_update(1, 19)
    assert not bar._should_update(2, 19)  # neither a 50th step nor `interval` seconds since the last refresh
    time.sleep(0.15)
    assert bar._should_update(3, 19)  # a step after `interval` seconds updates the count, whatever refresh_rate


def test_format_duration():
    from benchmarks.training import format_duration

    assert [format_duration(s) for s in (4.25, 42, 390, 7560)] == ["4.2 s", "42 s", "6.5 min", "2.1 h"]
