"""The regime sets of scripts/reproduction/plan.py (32 simulated workers, beta x workers, the inner
lr forms) and their report region (scripts/reproduction/regime.py), on synthetic run directories."""

from __future__ import annotations

from pathlib import Path

from scripts import reproduce as rp
from scripts.reproduction import plan as runs_plan
from scripts.reproduction import regime, report
from slowmo_train.algorithms.outer_optimizer import auto_beta
from tests.test_reproduce import CIFAR_BEST, fake_run


def _arg(cmd: list[str], key: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"{key}=")]
    assert len(values) == 1, (key, values)  # Hydra takes one value per key
    return values[0]


def test_regime_runs_are_simulated_with_the_paper_lr_rule_and_schedule_shape():
    runs = runs_plan.plan("regime")
    assert len(runs) == 8 * 3 and {r.seed for r in runs} == {1, 2, 3}
    for r in runs:
        cmd = r.command(Path("r"))
        assert _arg(cmd, "launcher.simulate") == "32" and _arg(cmd, "launcher.threads_per_worker") == "1"
        assert "launcher.nproc_per_node" not in " ".join(cmd)
        assert int(_arg(cmd, "train.batch_size")) * 32 == runs_plan.REGIME_BATCH
        epochs = float(_arg(cmd, "train.epochs"))
        assert float(_arg(cmd, "optim.warmup_epochs")) == epochs * 5 / 200
        assert [float(m) for m in _arg(cmd, "optim.milestones").strip("[]").split(",")] == [
            epochs / 2,
            epochs * 3 / 4,
            epochs * 7 / 8,
        ]
    follow = runs_plan.plan("regime_follow")
    assert all(r.shared == runs_plan.REGIME_SHARED and "slowmo.inner_lr=follow" in r.command(Path("r")) for r in follow)


def test_beta_workers_keeps_the_total_batch_and_changes_only_workers_and_beta():
    runs = runs_plan.plan("beta_workers")
    assert len(runs) == 2 * len(runs_plan.BETA_WORKERS_BETAS) * len(runs_plan.BETA_WORKERS_COUNTS)
    seen = set()
    for r in runs:
        cmd = r.command(Path("r"))
        n, batch = int(_arg(cmd, "launcher.simulate")), int(_arg(cmd, "train.batch_size"))
        assert n * batch == runs_plan.REGIME_BATCH
        seen.add((r.method.exp, n, float(_arg(cmd, "slowmo.beta"))))
        rest = [a for a in cmd if a.split("=", 1)[0] not in ("launcher.simulate", "train.batch_size", "slowmo.beta")]
        assert set(runs_plan.REGIME_SHARED) - {f"train.batch_size={runs_plan.REGIME_BATCH // 32}"} <= set(rest)
    assert len(seen) == len(runs)


def _synthetic_regime(runs_dir: Path) -> None:
    for r in runs_plan.plan("regime"):
        fake_run(r.run_dir(runs_dir), CIFAR_BEST[r.method.key] + (0.2 if r.seed == 1 else -0.2 * (r.seed - 2)), 1.0)
    for r in runs_plan.plan("regime_follow"):
        fake_run(r.run_dir(runs_dir), CIFAR_BEST[r.method.key.removesuffix("_follow")] + 2 + 0.1 * r.seed, 1.0)
    for r in runs_plan.plan("beta_workers"):
        n = int(r.method.key.split("_n")[1].split("_")[0])
        beta = float(r.method.key.split("beta")[1])
        peak = {4: 0.0, 8: 0.2, 16: 0.4, 32: 0.8}[n]  # the best beta grows with the workers
        fake_run(r.run_dir(runs_dir), 50 - 10 * abs(beta - peak), 1.0)
    for r in runs_plan.plan("regime_long"):
        fake_run(r.run_dir(runs_dir), 60.0, 0.5)
    for r in runs_plan.plan("translation_forms"):
        fake_run(r.run_dir(runs_dir), 30.0, 3.0, metric="ppl", final_extra={"bleu": 10.0 + r.method.key.endswith("w")})


def test_regime_report_tables_best_beta_and_plots(tmp_path):
    runs_dir = tmp_path / "runs"
    _synthetic_regime(runs_dir)
    img = tmp_path / "img"
    text = regime.render(runs_dir, img, Path("runs"), "img", report.CIFAR_PAPER, report.CIFAR_CLAIMS)
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.startswith("| Local SGD + SlowMo |"))
    assert "| 3 |" in row and "48.00 ± 0.20" in row and "93.20" in row
    assert "**reproduces**" in next(ln for ln in lines if ln.startswith("| Local SGD -> + SlowMo"))
    follow = next(ln for ln in lines if ln.startswith("| CIFAR-10 SGP + SlowMo |"))
    assert "49.30 ± 0.10" in follow and "follow better" in follow
    assert any(
        ln.startswith("| Multi30k SGP + SlowMo (4 workers) | 10.00 ± 0.00 | 11.00 ± 0.00 | +1.00") for ln in lines
    )
    table = lines[lines.index("| workers | measured best beta | slowmo.beta=auto |") + 2 :][:4]
    best = {int(ln.split("|")[1]): ln.split("|")[2].strip() for ln in table}
    assert best == {4: "0", 8: "0.2", 16: "0.4", 32: "0.8"}
    assert f"| 32 | 0.8 | {auto_beta(32):g} |" in text
    assert any(
        ln.startswith("| Local SGD | 1 |") and ln.endswith("| 60.00 ± 0.00 | 1.000 ± 0.000 | 0.500 ± 0.000 |")
        for ln in lines
    )
    for name in ("regime_cifar", "regime_beta_workers"):
        assert (img / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"img/{name}.png" in text


def test_write_report_rewrites_only_regions_with_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    _synthetic_regime(runs_dir)
    results = tmp_path / "RESULTS.md"
    kept = f"{report.BEGIN}\nthe 4-worker runs of another session\n{report.END}\n"
    results.write_text(f"# Results\n\n{regime.BEGIN}\nold\n{regime.END}\n\n{kept}")
    args = ["report", "--runs-dir", str(runs_dir), "--results", str(results), "--img-dir", str(tmp_path / "img")]
    assert rp.main(args) == 0
    text = results.read_text()
    assert kept in text and "\nold\n" not in text and "### The eight methods of Table 1 at 32 workers" in text
    assert text.index(regime.BEGIN) < text.index(report.BEGIN)  # a region stays where the document has it


def test_every_run_pins_its_inner_lr_so_the_commands_remake_the_reported_runs():
    """The runs were made while ``hold`` was the default: each command says which form it used."""
    for name in runs_plan.SETS:
        for r in runs_plan.plan(name):
            form = _arg(r.command(Path("r")), "slowmo.inner_lr")
            follows = r.method.key.endswith("follow") or name == regime.TRANSLATION_SET
            assert form == ("follow" if follows else "hold"), r.name


def test_translation_regime_runs_compose_to_the_options_they_name():
    """SGP alone, then SlowMo at the guided beta with Adam's buffers kept / reset / averaged, decoupled,
    and beta=auto: each command composes to exactly those options, the inner lr following the schedule."""
    from slowmo_train.config import to_job_config
    from slowmo_train.scripting import compose_config

    runs = runs_plan.plan(regime.TRANSLATION_SET)
    assert len(runs) == 6 * 3 and {r.seed for r in runs} == {1, 2, 3}
    seen = {}
    for r in runs[:6]:
        cmd = r.command(Path("r"))
        assert _arg(cmd, "launcher.simulate") == "4"
        job = to_job_config(compose_config(cmd[3:]))
        s = job.slowmo
        seen[r.method.key] = (s.enabled, s.beta, s.base_buffers, s.lr_coupling, s.inner_lr, s.tau)
    assert seen == {
        "sgp": (False, 0.7, "keep", "coupled", "follow", 12),  # SlowMo off: its defaults
        "sgp_slowmo_keep": (True, 0.2, "keep", "coupled", "follow", 48),
        "sgp_slowmo_reset": (True, 0.2, "reset", "coupled", "follow", 48),
        "sgp_slowmo_average": (True, 0.2, "average", "coupled", "follow", 48),
        "sgp_slowmo_decoupled": (True, 0.2, "keep", "decoupled", "follow", 48),
        "sgp_slowmo_beta0.6": (True, 0.6, "keep", "coupled", "follow", 48),
    }


def test_translation_and_few_worker_regions_are_written_alone_and_keep_the_regime_region(tmp_path):
    runs_dir = tmp_path / "runs"
    for r in runs_plan.plan(regime.FEW_SET):
        beta = float(r.method.key.split("beta")[1])
        fake_run(r.run_dir(runs_dir), 40 - 10 * abs(beta - 0.4), 1.0)
    for r in runs_plan.plan(regime.TRANSLATION_SET):
        bleu = {"sgp": 16.0, "sgp_slowmo_reset": 12.0}.get(r.method.key, 17.0) + 0.1 * r.seed
        fake_run(r.run_dir(runs_dir), 30.0, 3.0, metric="ppl", final_extra={"bleu": bleu})
    for r in runs_plan.plan(regime.BUFFERS_SET):
        fake_run(
            r.run_dir(runs_dir),
            {"localsgd": 27.0, "localsgd_slowmo_keep": 30.0}.get(r.method.key, 27.1) + 0.1 * r.seed,
            1.0,
        )
    results = tmp_path / "RESULTS.md"
    begin, end, _ = regime.SMALL_REGIONS[regime.TRANSLATION_SET].markers
    few_begin, few_end, _ = regime.SMALL_REGIONS[regime.FEW_SET].markers
    results.write_text(
        f"# Results\n\n{regime.BEGIN}\nthe 32-worker runs\n{regime.END}\n\n{few_begin}\nold\n{few_end}\n\n"
        f"{begin}\nold\n{end}\n"
    )
    args = ["report", "--runs-dir", str(runs_dir), "--results", str(results), "--img-dir", str(tmp_path / "img")]
    assert rp.main(args) == 0
    text = results.read_text()
    assert "\nthe 32-worker runs\n" in text and "\nold\n" not in text
    lines = text.splitlines()
    assert next(ln for ln in lines if ln.startswith("| SGP |")).startswith("| SGP | 3 | 16.20 ± 0.10 |")
    reset = next(ln for ln in lines if ln.startswith("| SGP + SlowMo, beta 0.2, Adam buffers reset |"))
    assert "| -4.00 (spread 0.14) | does not reproduce |" in reset
    keep = next(ln for ln in lines if ln.startswith("| SGP + SlowMo, beta 0.2, Adam buffers kept |"))
    assert keep.endswith("| +1.00 (spread 0.14) | reproduces |")
    assert "slowmo.inner_lr=follow" in text and "launcher.simulate=4" in text
    assert "| 2 | 36.00 | 38.00 | 40.00 | 38.00 | 36.00 |" in text  # the two bases' rows
    assert f"| 2 | 0.4 | {auto_beta(2):g} |" in text and "launcher.simulate=2" in text
    kept = next(ln for ln in lines if ln.startswith("| Local SGD + SlowMo, buffers kept |"))
    assert kept.endswith("| 30.20 ± 0.10 | 1.000 ± 0.000 | +3.00 (spread 0.14) | reproduces |")
    assert "| vs Local SGD | verdict (better than Local SGD) |" in text and "launcher.simulate=32" in text
