"""What the reproduction runs: the sets of runs (``SETS``), each a list of methods x seeds with
the set's shared overrides, and the command of every run (scripts/reproduce.py runs them).

Every run is one call of the project's own CLI with the set's shared overrides, which are the same
for every method: the same budget, schedule and tuning effort for all of them.
"""

from __future__ import annotations

from .runs import (  # noqa: F401 - run_state, portable, REPO and DATA: the scripts' and tests' too
    CIFAR_ROOT,
    DATA,
    HELD_LR,
    MULTI30K_ROOT,
    REAL_LAUNCH,
    REPO,
    Method,
    PlannedRun,
    RunSet,
    portable,
    run_state,
)

SEEDS = (1, 2)


# CIFAR-10 settings, measured on the 2-core machine with nothing else running: 4 workers x 32
# images = 128 in total, so quickstart's lr 0.4 per 256 images (peak 0.2) applies unchanged; width
# 0.125 (0.18M parameters) trains ~1200-1450 images/s with 4 one-thread workers and evaluates the
# 10k test images in ~2.5 s, so an epoch of a 30k subset costs ~25 s and a run of 4 epochs (936
# steps, 78 outer steps at tau 12) ~1.8 min with ~14 s of start-up (measured: OSGP + SlowMo 1 min
# 46 s, 63.7 % test top-1; AR-SGD with 3 epochs 89 s, 62.3 %).
# A 30k subset rather than all 50k buys a fourth epoch at the same cost (more epochs rather
# than more data), i.e. a learning curve and the lr drop; the paper's schedule shape (warm-up,
# lr / 10 for the last quarter) is compressed to those 4 epochs as in configs/exp/quickstart.yaml.
CIFAR_SHARED = (
    f"data.root={CIFAR_ROOT}",
    "model.width=0.125",
    "train.batch_size=32",
    "data.train_subset=30000",
    "train.epochs=4",
    "train.eval_every_epochs=1",
    "train.eval_batch_size=250",
    "train.log_every=20",
    "train.progress=log",
    "optim.lr=0.4",
    "optim.warmup_epochs=0.2",
    "optim.milestone_epochs_of=4",
    "optim.milestones=[3]",
    "checkpoint.every_minutes=2",
    HELD_LR,
)
# The sweep: 12 runs in ~12 min, so the same subset, model, batch, lr and schedule shape as
# CIFAR_SHARED for 2 epochs only (468 steps, 19 outer steps even at tau 24; measured: 20k images x
# 2 epochs took 46 s, so ~56 s per run here).
SWEEP_SHARED = (
    f"data.root={CIFAR_ROOT}",
    "model.width=0.125",
    "train.batch_size=32",
    "data.train_subset=30000",
    "train.epochs=2",
    "train.eval_every_epochs=1",
    "train.eval_batch_size=250",
    "train.log_every=20",
    "train.progress=log",
    "optim.lr=0.4",
    "optim.warmup_epochs=0.2",
    "optim.milestone_epochs_of=2",
    "optim.milestones=[1.5]",
    "checkpoint.every_minutes=2",
    HELD_LR,
)
# Translation: configs/exp/wmt16_small_cpu.yaml (transformer_small, 8k joint vocabulary, Adam at
# 2e-3 with a short warm-up, test2016 BLEU) cut to ~3 min per run with 4 workers: half width
# (d_model 128, 2.4M parameters), 1024 tokens per worker and step (241 steps per epoch), 2 epochs
# (measured idle: AR-Adam 2 min 55 s, test2016 BLEU 20.9; under load Local Adam + SlowMo 11.7).
# BLEU (beam search over the 1000 test2016 sentences, ~14 s) only at the final evaluation; the
# per-epoch evaluations give the validation perplexity curve.
TRANSLATION_SHARED = (
    f"data.root={MULTI30K_ROOT}",
    "model.arch=transformer_small",
    "model.width=0.5",
    "data.vocab_size=8000",
    "data.max_tokens=1024",
    "train.epochs=2",
    "train.eval_every_epochs=1",
    "train.log_every=20",
    "train.progress=log",
    "optim.lr=2e-3",
    "optim.warmup_steps=100",
    "eval.bleu_split=test",
    "checkpoint.every_minutes=2",
    HELD_LR,
)
# Streamed SlowMo: the outer all-reduce in 4 fragments, applied one step late, in bf16.
STREAMED = ("slowmo.overlap_steps=1", "slowmo.fragments=4", "slowmo.outer_dtype=bfloat16")

CIFAR_METHODS = tuple(
    Method(key, label, f"cifar10_{key}")
    for key, label in [
        ("allreduce", "AR-SGD"),
        ("allreduce_slowmo", "AR-SGD + SlowMo"),
        ("localsgd", "Local SGD"),
        ("localsgd_slowmo", "Local SGD + SlowMo"),
        ("sgp", "SGP"),
        ("sgp_slowmo", "SGP + SlowMo"),
        ("osgp", "OSGP"),
        ("osgp_slowmo", "OSGP + SlowMo"),
    ]
)
STREAMED_METHODS = (
    Method("localsgd_slowmo_streamed", "Local SGD + SlowMo (streamed)", "cifar10_localsgd_slowmo", STREAMED),
    Method("sgp_slowmo_streamed", "SGP + SlowMo (streamed)", "cifar10_sgp_slowmo", STREAMED),
)
# which of the three streamed options moves the accuracy (Local SGD + SlowMo, one option at a time)
STREAMED_PARTS = tuple(
    Method(f"localsgd_slowmo_{key}", f"Local SGD + SlowMo, {option} only", "cifar10_localsgd_slowmo", (option,))
    for key, option in zip(("D1", "F4", "bf16"), STREAMED)
)
SWEEP_BETAS = (0.0, 0.4, 0.6, 0.8)
SWEEP_TAUS = (6, 12, 24)
# pure BMUF: Local SGD's averaging period equals SlowMo's tau (Sec. 3: Local SGD + SlowMo = BMUF)
SWEEP_METHODS = tuple(
    Method(
        f"beta{beta:g}_tau{tau}",
        f"beta={beta:g}, tau={tau}",
        "cifar10_localsgd_slowmo",
        (f"slowmo.beta={beta:g}", f"slowmo.tau={tau}", f"algorithm.period={tau}"),
    )
    for beta in SWEEP_BETAS
    for tau in SWEEP_TAUS
)
TRANSLATION_METHODS = tuple(
    Method(key, label, f"wmt16_{key}")
    for key, label in [
        ("allreduce", "AR-Adam"),
        ("localsgd", "Local Adam"),
        ("localsgd_slowmo", "Local Adam + SlowMo"),
        ("sgp", "SGP"),
        ("sgp_slowmo", "SGP + SlowMo"),
    ]
)
# Not part of the comparison (its verdicts use only the equally tuned runs above): where SlowMo
# loses on Multi30k, is it the exact average every tau steps or the slow momentum? beta = 0 keeps
# the averaging and drops the momentum; half the lr, 2e-3 (1 - beta), gives SlowMo's outer step
# the long-run size of the base's own (with alpha = 1 the momentum scales it by 1 / (1 - beta)).
DIAGNOSTIC_METHODS = (
    Method("sgp_slowmo_beta0", "SGP + SlowMo, beta = 0", "wmt16_sgp_slowmo", ("slowmo.beta=0",)),
    Method("sgp_slowmo_lr1e-3", "SGP + SlowMo, lr 1e-3", "wmt16_sgp_slowmo", ("optim.lr=1e-3",)),
    Method("localsgd_slowmo_lr1e-3", "Local Adam + SlowMo, lr 1e-3", "wmt16_localsgd_slowmo", ("optim.lr=1e-3",)),
)

# --- SlowMo's own regime (the paper's Sec. 5 protocol at a size this machine trains to the end) ---
# 32 workers played by the simulated cluster (one process, one thread) x 16 images = 512 in total,
# i.e. a tenth of the 5,120-image CIFAR-10 subset per step (the paper: 4096 of 50k, 12 steps per
# epoch; here 10). The paper's lr rule (0.1 per 256 images, peak 0.2) and schedule shape over 16
# epochs (160 steps, 13 outer iterations at tau 12): warm-up 5/200 of the run, lr / 10 at 1/2, 3/4
# and 7/8. Width 1/16 (44.6k parameters): ~600 images/s on one core, ~2.5 min per run, so two
# runs go side by side on the 2 cores. SlowMo at the paper's alpha 1, beta 0.7, tau 12, untuned;
# nothing else is tuned for any method. Test top-1 on all 10k test images every 4 epochs.
REGIME_WORKERS, REGIME_BATCH = 32, 512
SIMULATED_LAUNCH = (f"launcher.simulate={REGIME_WORKERS}", "launcher.threads_per_worker=1")


def regime_shared(epochs: int) -> tuple[str, ...]:
    """The regime protocol for a run of ``epochs`` epochs (10 steps each): the paper's schedule shape
    scaled to the run, warm-up 5/200 of it and lr / 10 at 1/2, 3/4 and 7/8."""
    return (
        f"data.root={CIFAR_ROOT}",
        "model.width=0.0625",
        f"train.batch_size={REGIME_BATCH // REGIME_WORKERS}",
        "data.train_subset=5120",
        f"train.epochs={epochs}",
        f"train.eval_every_epochs={epochs // 4}",
        "train.eval_batch_size=500",
        "train.log_every=10",
        "train.progress=log",
        "optim.lr=0.1",
        f"optim.warmup_epochs={epochs * 5 / 200:g}",
        f"optim.milestone_epochs_of={epochs}",
        f"optim.milestones=[{epochs // 2:g},{epochs * 3 / 4:g},{epochs * 7 / 8:g}]",
        "checkpoint.every_minutes=2",
        HELD_LR,
    )


REGIME_SHARED = regime_shared(16)
# Is it the length? Local SGD with and without SlowMo (the paper's largest gain, 91.73 -> 93.20)
# trained 3x longer (48 epochs, 480 steps, 40 outer iterations), two seeds
REGIME_LONG_METHODS = tuple(m for m in CIFAR_METHODS if m.key in ("localsgd", "localsgd_slowmo"))
# the lr schedule inside an outer iteration: every inner step follows the schedule (its warm-up and
# drops) instead of Algorithm 1's value held for tau steps
FOLLOW = ("slowmo.inner_lr=follow",)
REGIME_FOLLOW_METHODS = tuple(
    Method(f"{m.key}_follow", f"{m.label}, inner lr follows", m.exp, FOLLOW)
    for m in CIFAR_METHODS
    if m.key in ("localsgd_slowmo", "sgp_slowmo")
)
# beta against the number of workers at the same total batch, lr, schedule and number of steps:
# only how many models are averaged (and the per-worker batch 512 / n) changes
BETA_WORKERS_BETAS = (0.0, 0.2, 0.4, 0.6, 0.8)
BETA_WORKERS_COUNTS = (4, 8, 16, 32)


def beta_workers_methods(counts: tuple[int, ...]) -> tuple[Method, ...]:
    return tuple(
        Method(
            f"{base}_n{n}_beta{beta:g}",
            f"{label}, {n} workers, beta={beta:g}",
            f"cifar10_{base}",
            (f"slowmo.beta={beta:g}", f"launcher.simulate={n}", f"train.batch_size={REGIME_BATCH // n}"),
        )
        for base, label in (("localsgd_slowmo", "Local SGD + SlowMo"), ("sgp_slowmo", "SGP + SlowMo"))
        for n in counts
        for beta in BETA_WORKERS_BETAS
    )


BETA_WORKERS_METHODS = beta_workers_methods(BETA_WORKERS_COUNTS)
# below the sweep's 4 workers, where beta=auto's 0 is the authors' guidance, not a measurement
BETA_FEW_COUNTS = (2,)
# the schedule forms on Multi30k SGP + SlowMo (4 workers, simulated: same runs as real processes)
TRANSLATION_FORMS = tuple(
    Method(f"sgp_slowmo_{form}", f"SGP + SlowMo, inner lr {form}s", "wmt16_sgp_slowmo", (f"slowmo.inner_lr={form}",))
    for form in ("hold", "follow")
)

# Translation again, at 4 workers: the slow momentum of the authors' guidance for 4 nodes (0.2) and
# the CIFAR-10 curve's 0.6 (beta=auto with SGD; with Adam, auto now follows the guidance), the inner
# lr following the schedule (the better form, measured above), and what SlowMo does with Adam's
# buffers at the outer step (kept, the paper's; reset; averaged) or its update decoupled from the lr.
# SGP alone is the base; everything else as the translation set.
TRANSLATION_REGIME_SHARED = tuple(a for a in TRANSLATION_SHARED if a != HELD_LR) + FOLLOW
GUIDED_BETA = "slowmo.beta=0.2"
TRANSLATION_REGIME_METHODS = (
    Method("sgp", "SGP", "wmt16_sgp"),
    *(
        Method(f"sgp_slowmo_{key}", f"SGP + SlowMo, {label}", "wmt16_sgp_slowmo", extra)
        for key, label, extra in [
            ("keep", "beta 0.2, Adam buffers kept", (GUIDED_BETA, "slowmo.base_buffers=keep")),
            ("reset", "beta 0.2, Adam buffers reset", (GUIDED_BETA, "slowmo.base_buffers=reset")),
            ("average", "beta 0.2, Adam buffers averaged", (GUIDED_BETA, "slowmo.base_buffers=average")),
            (
                "decoupled",
                "beta 0.2, decoupled",
                (GUIDED_BETA, "slowmo.base_buffers=keep", "slowmo.lr_coupling=decoupled"),
            ),
            (
                "beta0.6",
                "beta 0.6 (auto's value with SGD), Adam buffers kept",
                ("slowmo.beta=0.6", "slowmo.base_buffers=keep"),
            ),
        ]
    ),
)
# SGD's momentum buffers at SlowMo's outer step, kept or averaged instead of reset (Alg. 1, the regime
# set's runs), against Local SGD alone
REGIME_BUFFERS_METHODS = (
    CIFAR_METHODS[2],
    *(
        Method(
            f"localsgd_slowmo_{b}",
            f"Local SGD + SlowMo, buffers {label}",
            "cifar10_localsgd_slowmo",
            (f"slowmo.base_buffers={b}",),
        )
        for b, label in (("keep", "kept"), ("average", "averaged"))
    ),
)
SIMULATED_4 = ("launcher.simulate=4", "launcher.threads_per_worker=1")

SETS: dict[str, RunSet] = {
    "cifar": RunSet("cifar", "CIFAR-10, ResNet-18 x 0.125, 4 workers", CIFAR_METHODS, SEEDS, CIFAR_SHARED),
    "streamed": RunSet(
        "streamed",
        "CIFAR-10, streamed SlowMo (4 fragments, one step late, bf16)",
        STREAMED_METHODS,
        SEEDS,
        CIFAR_SHARED,
    ),
    "streamed_parts": RunSet(
        "streamed_parts",
        "CIFAR-10, Local SGD + SlowMo with one streamed option at a time",
        STREAMED_PARTS,
        SEEDS,
        CIFAR_SHARED,
    ),
    "sweep": RunSet("sweep", "CIFAR-10, Local SGD + SlowMo, beta x tau", SWEEP_METHODS, (1,), SWEEP_SHARED),
    "translation": RunSet(
        "translation",
        "Multi30k En-De, transformer_small x 0.5, 4 workers, Adam",
        TRANSLATION_METHODS,
        SEEDS,
        TRANSLATION_SHARED,
    ),
    "diagnostics": RunSet(
        "diagnostics",
        "Multi30k En-De as the translation set, SlowMo's beta or lr changed (diagnosis, not comparison)",
        DIAGNOSTIC_METHODS,
        (1,),
        TRANSLATION_SHARED,
    ),
    "regime": RunSet(
        "regime",
        "CIFAR-10 subset, ResNet-18 x 1/16, 32 simulated workers x 16, trained through the paper's schedule",
        CIFAR_METHODS,
        (1, 2, 3),
        REGIME_SHARED,
        SIMULATED_LAUNCH,
    ),
    "regime_follow": RunSet(
        "regime_follow",
        "as regime, SlowMo's inner steps following the lr schedule",
        REGIME_FOLLOW_METHODS,
        (1, 2, 3),
        REGIME_SHARED,
        SIMULATED_LAUNCH,
    ),
    "regime_long": RunSet(
        "regime_long",
        "as regime, 3x longer (48 epochs), Local SGD with and without SlowMo",
        REGIME_LONG_METHODS,
        (1, 2),
        regime_shared(48),
        SIMULATED_LAUNCH,
    ),
    "beta_workers": RunSet(
        "beta_workers",
        "as regime, beta x number of workers at the same total batch",
        BETA_WORKERS_METHODS,
        (1,),
        REGIME_SHARED,
        SIMULATED_LAUNCH,
    ),
    "beta_workers_few": RunSet(
        "beta_workers_few",
        "CIFAR-10 subset, beta x workers below 4 workers",
        beta_workers_methods(BETA_FEW_COUNTS),
        (1, 2),
        REGIME_SHARED,
        SIMULATED_LAUNCH,
    ),
    "regime_buffers": RunSet(
        "regime_buffers",
        "CIFAR-10 subset at 32 workers as the regime set, Local SGD + SlowMo's momentum buffers kept or averaged",
        REGIME_BUFFERS_METHODS,
        (1, 2, 3),
        REGIME_SHARED,
        SIMULATED_LAUNCH,
    ),
    "translation_forms": RunSet(
        "translation_forms",
        "Multi30k as the translation set, SGP + SlowMo with the inner lr held or following the schedule",
        TRANSLATION_FORMS,
        (1, 2),
        TRANSLATION_SHARED,
        SIMULATED_4,
    ),
    "translation_regime": RunSet(
        "translation_regime",
        "Multi30k as the translation set, 4 simulated workers, SGP + SlowMo: the guided beta, Adam buffers, decoupled",
        TRANSLATION_REGIME_METHODS,
        (1, 2, 3),
        TRANSLATION_REGIME_SHARED,
        SIMULATED_4,
    ),
}


def plan(set_name: str) -> list[PlannedRun]:
    run_set = SETS[set_name]
    return [
        PlannedRun(set_name, m, seed, run_set.shared, run_set.launch) for seed in run_set.seeds for m in run_set.methods
    ]
