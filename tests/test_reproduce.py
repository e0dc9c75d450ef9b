"""scripts/reproduce.py and scripts/reproduction/: the plan, skip/resume, verdicts and the report on
synthetic run directories.

    .venv/bin/python -m pytest -q tests/test_reproduce.py              # fast (a few seconds)
    .venv/bin/python -m pytest -q -m slow tests/test_reproduce.py      # + a real 4-worker tiny run
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts import reproduce as rp
from scripts.reproduction import plan as runs_plan
from scripts.reproduction import report, verdicts

REPO = Path(__file__).resolve().parents[1]


# --- plan --------------------------------------------------------------------------------------------
def test_cifar_plan_has_every_method_and_seed_with_identical_shared_overrides():
    runs = runs_plan.plan("cifar")
    keys = {r.method.key for r in runs}
    assert keys == {
        "allreduce",
        "allreduce_slowmo",
        "localsgd",
        "localsgd_slowmo",
        "sgp",
        "sgp_slowmo",
        "osgp",
        "osgp_slowmo",
    }
    assert len(runs) == 16 and {r.seed for r in runs} == {1, 2}
    runs_dir = Path("/tmp/x")
    for r in runs:
        cmd = r.command(runs_dir)
        assert cmd[:4] == [sys.executable, "-m", "slowmo_train", f"+exp=cifar10_{r.method.key}"]
        assert "launcher.nproc_per_node=4" in cmd and "launcher.threads_per_worker=1" in cmd
        assert f"seed={r.seed}" in cmd and f"output_dir={runs_dir}/cifar/{r.method.key}_s{r.seed}" in cmd
        # everything after the per-run part is the set's shared overrides, the same for every method
        assert cmd[8:] == list(runs_plan.CIFAR_SHARED)
        assert "resume=auto" not in cmd and r.command(runs_dir, resume=True)[-1] == "resume=auto"
    assert len({r.run_dir(runs_dir) for r in runs}) == 16


def test_every_exp_config_named_in_the_plan_exists():
    for name in runs_plan.SETS:
        for r in runs_plan.plan(name):
            assert (REPO / "configs" / "exp" / f"{r.method.exp}.yaml").exists(), r.method.exp


def test_streamed_sweep_and_translation_plans():
    streamed = runs_plan.plan("streamed")
    assert len(streamed) == 4 and {r.method.exp for r in streamed} == {"cifar10_localsgd_slowmo", "cifar10_sgp_slowmo"}
    assert all(set(runs_plan.STREAMED) <= set(r.command(Path("r"))) for r in streamed)
    assert all(r.shared == runs_plan.CIFAR_SHARED for r in streamed)  # comparable with the exact cifar runs
    sweep = runs_plan.plan("sweep")
    assert len(sweep) == 12 and {r.seed for r in sweep} == {1}
    for r in sweep:
        tau = [a for a in r.method.extra if a.startswith("slowmo.tau=")][0].split("=")[1]
        assert f"algorithm.period={tau}" in r.method.extra  # pure BMUF
    translation = runs_plan.plan("translation")
    assert {r.method.exp for r in translation} == {
        "wmt16_allreduce",
        "wmt16_localsgd",
        "wmt16_localsgd_slowmo",
        "wmt16_sgp",
        "wmt16_sgp_slowmo",
    }
    assert {r.seed for r in translation} == set(runs_plan.SEEDS) and len(translation) == 5 * len(runs_plan.SEEDS)


def test_dry_run_prints_commands_and_marks_finished_runs(tmp_path, capsys):
    done = runs_plan.plan("translation")[0].run_dir(tmp_path)
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert rp.main(["translation", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(runs_plan.plan("translation"))
    assert lines[0].startswith("# done: ") and not lines[1].startswith("#")
    assert not (tmp_path / "translation" / "machine.json").exists()  # a dry run writes nothing


# --- skip / resume -----------------------------------------------------------------------------------
def test_run_state(tmp_path):
    assert runs_plan.run_state(tmp_path / "missing") == "new"
    (tmp_path / "checkpoints" / "step_00000010").mkdir(parents=True)
    assert runs_plan.run_state(tmp_path) == "resume"
    (tmp_path / "summary.json").write_text("{}")
    assert runs_plan.run_state(tmp_path) == "done"


def test_run_set_skips_finished_resumes_checkpointed_and_reports_failures(tmp_path, monkeypatch, capsys):
    runs = runs_plan.plan("translation")
    finished, checkpointed, stale = (r.run_dir(tmp_path) for r in runs[:3])
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    (checkpointed / "checkpoints" / "step_00000005").mkdir(parents=True)
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"event": "train", "step": 1, "time": 0, "loss": 9}\n')
    launched = []

    class FakeProc:
        def __init__(self, cmd, cwd, stdout, stderr, start_new_session):
            launched.append(cmd)
            self.ok = "resume=auto" in cmd  # the resumed run finishes, the others fail
            out = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
            if self.ok:
                (out / "summary.json").write_text("{}")
            else:
                stdout.write("slowmo-train: error: need a base without push-sum\n")

        def wait(self):
            return 0 if self.ok else 1

    monkeypatch.setattr(rp.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(rp, "machine_info", lambda: {"cpu": "test"})
    failed = rp.run_set("translation", tmp_path)
    out = capsys.readouterr().out
    assert len(launched) == len(runs) - 1  # the finished run is skipped
    assert "resume=auto" in launched[0] and all("resume=auto" not in c for c in launched[1:])
    assert failed == [r.name for r in runs[2:]]
    assert not (stale / "metrics.jsonl").exists()  # a run without checkpoint starts from scratch
    assert "need a base without push-sum" in out and "eta" in out and f"1 of {len(runs)} runs already finished" in out


def test_ctrl_c_forwards_one_sigint_and_stops_the_set(tmp_path, monkeypatch, capsys):
    sent = []

    class InterruptedProc:
        def __init__(self, cmd, cwd, stdout, stderr, start_new_session):
            assert start_new_session  # the terminal's SIGINT must not reach the CLI a second time
            self.waits = 0

        def wait(self):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return 0

        def send_signal(self, sig):
            sent.append(sig)

    monkeypatch.setattr(rp.subprocess, "Popen", InterruptedProc)
    monkeypatch.setattr(rp, "machine_info", lambda: {"cpu": "test"})
    with pytest.raises(KeyboardInterrupt):
        rp.run_set("translation", tmp_path)
    assert sent == [rp.signal.SIGINT]
    assert "run the same command again to continue" in capsys.readouterr().out


# --- verdicts ----------------------------------------------------------------------------------------
def test_verdict_against_seed_spread():
    S = verdicts.Stat
    assert verdicts.verdict(S(50, 0.3, 2), S(52, 0.4, 2))[0] == "reproduces"
    assert verdicts.verdict(S(52, 0.3, 2), S(50, 0.4, 2))[0] == "does not reproduce"
    assert verdicts.verdict(S(50, 1.0, 2), S(50.5, 1.0, 2))[0] == "not resolved"
    assert verdicts.verdict(S(50, None, 1), S(55, None, 1))[0] == "not resolved"
    assert verdicts.verdict(S(50, None, 1), S(55, None, 1), noise=1.0)[0] == "reproduces"
    assert verdicts.verdict(S(50, 0.3, 2), S(50.2, 0.3, 2), kind="no_gain")[0] == "reproduces"
    assert verdicts.verdict(S(50, 0.3, 2), S(53, 0.3, 2), kind="no_gain")[0] == "does not reproduce"
    assert verdicts.verdict(None, S(1, None, 1))[0] == "no data"
    assert verdicts.stat([1.0, 3.0]).sd == pytest.approx(2**0.5) and verdicts.stat([2.0]).sd is None


# --- report on synthetic runs ------------------------------------------------------------------------
def fake_run(
    run_dir: Path,
    best: float,
    loss: float,
    metric: str = "top1",
    bytes_per_step: float = 1e5,
    final_extra: dict | None = None,
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "model": {"width": 0.125}}))
    events = [
        {"event": "train", "step": s, "time": 100.0 + 0.05 * s, "loss": loss + (100 - s) / 50}
        for s in (20, 40, 60, 80, 100)
    ]
    events += [
        {"event": "eval", "step": s, "time": 100.0 + 0.05 * s + 0.01, "split": "test", metric: best - (100 - s) / 10}
        for s in (50, 100)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "steps": 100,
                "metric": metric,
                "best": best,
                "comm_bytes_sent_per_step": bytes_per_step,
                "final_eval": {"split": "test", metric: best, **(final_extra or {})},
            }
        )
    )


CIFAR_BEST = {
    "allreduce": 50.0,
    "allreduce_slowmo": 50.1,
    "localsgd": 45.0,
    "localsgd_slowmo": 48.0,
    "sgp": 47.0,
    "sgp_slowmo": 47.1,
    "osgp": 49.0,
    "osgp_slowmo": 46.0,
}


@pytest.fixture
def synthetic_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    for r in runs_plan.plan("cifar"):
        jitter = 0.2 if r.seed == 1 else -0.2
        fake_run(r.run_dir(runs_dir), CIFAR_BEST[r.method.key] + jitter, 1.0 - 0.1 * ("slowmo" in r.method.key))
    for r in runs_plan.plan("streamed"):
        fake_run(r.run_dir(runs_dir), CIFAR_BEST[r.method.key.removesuffix("_streamed")] - 0.3, 1.0)
    for r in runs_plan.plan("sweep"):
        beta = float(r.method.key.split("_")[0][4:])
        fake_run(r.run_dir(runs_dir), 40 + 5 * beta, 1.0)
    for r in runs_plan.plan("translation")[:3]:  # one translation run missing: its rows say so
        fake_run(r.run_dir(runs_dir), 50.0, 4.0, metric="ppl", final_extra={"bleu": 20.0 + len(r.method.key) / 10})
    return runs_dir


def test_report_tables_verdicts_and_plots(synthetic_runs, tmp_path):
    img = tmp_path / "img"
    text = report.render(synthetic_runs, img)
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("| Local SGD + SlowMo |"))
    assert "48.00 ± 0.28" in row and "| 2 |" in row and "93.20" in row and "100.0 kB" in row
    claim = lambda what: next(ln for ln in lines if ln.startswith(f"| {what}"))  # noqa: E731
    assert "**reproduces**" in claim("Local SGD -> + SlowMo, best")
    assert "**does not reproduce**" in claim("OSGP -> + SlowMo")
    assert "**not resolved**" in claim("SGP -> + SlowMo")
    assert "**reproduces**" in claim("SlowMo over AR-SGD does not help")
    assert "**reproduces**" in claim("Local SGD -> + SlowMo, final train loss")
    assert "**reproduces**" in claim("beta in 0.4-0.8 beats beta = 0")
    assert "**not resolved**" in claim("tau 6 more accurate")
    assert "no data" in claim("SGP + SlowMo beats AR-Adam")
    assert "| Local Adam + SlowMo | 1 | 21.50 | 50.00 |" in text  # final BLEU, then best valid ppl
    assert "+0.70 (one seed, no spread) | **not resolved**" in claim("Local Adam -> + SlowMo")
    streamed = next(ln for ln in lines if ln.startswith("| Local SGD + SlowMo |") and "yes" in ln)
    assert "-0.30" in streamed
    assert "### Streamed vs exact SlowMo" in text and "ms / iter" in text
    for name in ("cifar", "translation", "sweep"):
        png = img / f"reproduce_{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"img/reproduce_{name}.png" in text


def test_report_on_no_runs_says_how_to_make_them(tmp_path):
    text = report.render(tmp_path / "none", tmp_path / "img")
    assert "No finished runs yet: `scripts/reproduce.py cifar`." in text
    assert not (tmp_path / "img").exists()


def test_region_replacement_keeps_the_rest_of_the_document():
    doc = "# Results\n\n## Hand-written\n\nkeep me\n"
    once = report.replace_region(doc, "body 1\n")
    assert once.startswith(doc.rstrip()) and report.HEADING in once and "body 1" in once
    twice = report.replace_region(once + "\n## After\n\nkeep me too\n", "body 2\n")
    assert "body 1" not in twice and "body 2" in twice and "keep me too" in twice
    assert twice.count(report.BEGIN) == 1 and twice.count(report.HEADING) == 1 and "keep me\n" in twice


def test_main_report_writes_only_given_paths(synthetic_runs, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nhand-written\n")
    assert (
        rp.main(
            [
                "report",
                "--runs-dir",
                str(synthetic_runs),
                "--results",
                str(results),
                "--img-dir",
                str(tmp_path / "docs_img"),
            ]
        )
        == 0
    )
    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written\n") and report.BEGIN in text
    assert "](docs_img/reproduce_cifar.png)" in text and (tmp_path / "docs_img" / "reproduce_sweep.png").exists()


# --- a real run --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiproc
def test_real_tiny_run_is_reported(tmp_path):
    """One tiny 4-worker CIFAR-10 run through the CLI, then the report reads it."""
    run = runs_plan.plan("cifar")[3]  # Local SGD + SlowMo
    cmd = run.command(tmp_path) + [
        "data.train_subset=512",
        "train.epochs=1",
        "train.log_every=2",
        "train.eval_batch_size=1000",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert runs_plan.run_state(run.run_dir(tmp_path)) == "done"
    groups = verdicts.load_set("cifar", tmp_path)
    assert list(groups) == ["localsgd_slowmo"] and groups["localsgd_slowmo"].best().mean > 0
    assert "Local SGD + SlowMo" in report.render(tmp_path, tmp_path / "img")


def test_diagnostic_runs_replace_the_shared_value_of_their_key():
    runs = {r.method.key: r.command(Path("r")) for r in runs_plan.plan("diagnostics")}
    lr = runs["sgp_slowmo_lr1e-3"]
    assert [a for a in lr if a.startswith("optim.lr=")] == ["optim.lr=1e-3"]
    beta0 = runs["sgp_slowmo_beta0"]
    assert "slowmo.beta=0" in beta0 and "optim.lr=2e-3" in beta0
    # every other argument is the translation set's, so the rows compare one change at a time
    shared = set(runs_plan.TRANSLATION_SHARED) - {"optim.lr=2e-3"}
    assert all(shared <= set(cmd) for cmd in runs.values())


def test_streamed_parts_change_one_option_of_the_streamed_runs_each():
    parts = runs_plan.plan("streamed_parts")
    assert {r.seed for r in parts} == set(runs_plan.SEEDS) and all(r.shared == runs_plan.CIFAR_SHARED for r in parts)
    options = [r.method.extra for r in parts if r.seed == 1]
    assert sorted(o for (o,) in options) == sorted(runs_plan.STREAMED)
    assert all(r.method.exp == "cifar10_localsgd_slowmo" for r in parts)


def test_streamed_parts_table(synthetic_runs, tmp_path):
    for r in runs_plan.plan("streamed_parts"):
        fake_run(r.run_dir(synthetic_runs), CIFAR_BEST["localsgd_slowmo"] + (1.0 if "F4" in r.method.key else 0.0), 1.0)
    text = report.render(synthetic_runs, tmp_path / "img")
    row = next(ln for ln in text.splitlines() if ln.startswith("| slowmo.fragments=4 only |"))
    assert "49.00 ± 0.00" in row and "+1.00" in row
    assert any(ln.startswith("| all three | 47.70") for ln in text.splitlines())
