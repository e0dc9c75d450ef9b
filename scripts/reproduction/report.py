"""The report of the reproduction: the Markdown region of docs/RESULTS.md between ``BEGIN`` and
``END`` (tables of the methods, the paper's claims with their verdicts, the sweep and the streamed
comparison) and the plots ``docs/img/reproduce_*.png`` (drawn by plots.py), from the finished runs of
every set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slowmo_train.scripting import markdown_table

from . import regime, time_report
from .plan import DIAGNOSTIC_METHODS, REPO, SETS, STREAMED, STREAMED_PARTS, SWEEP_BETAS, SWEEP_TAUS, plan, portable
from .plots import plot_curves, plot_heatmap
from .verdicts import (
    CLAIM_HEADER,
    Claim,
    MethodRuns,
    Stat,
    best_grid,
    claims_table,
    load_set,
    loss_claim,
    stat,
    verdict,
)

BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
HEADING = "## Outside the regime: the first reproduction (4 workers, batch 128)"


CIFAR_PAPER = {
    "allreduce": "92.66",
    "localsgd": "91.73",
    "localsgd_slowmo": "93.20",
    "sgp": "93.90",
    "sgp_slowmo": "94.32",
    "osgp": "93.17",
    "osgp_slowmo": "93.74",
}
TRANSLATION_PAPER = {
    "allreduce": "27.17",
    "localsgd": "26.62",
    "localsgd_slowmo": "27.14",
    "sgp": "26.92",
    "sgp_slowmo": "27.84",
}
CIFAR_CLAIMS = (
    Claim("Local SGD -> + SlowMo, best test top-1", "localsgd", "localsgd_slowmo", "91.73 -> 93.20"),
    Claim("OSGP -> + SlowMo, best test top-1", "osgp", "osgp_slowmo", "93.17 -> 93.74"),
    Claim("SGP -> + SlowMo, best test top-1", "sgp", "sgp_slowmo", "93.90 -> 94.32"),
    Claim("Local SGD + SlowMo beats AR-SGD, best test top-1", "allreduce", "localsgd_slowmo", "92.66 < 93.20"),
    Claim("SGP + SlowMo beats AR-SGD, best test top-1", "allreduce", "sgp_slowmo", "92.66 < 94.32"),
    Claim(
        "SlowMo over AR-SGD does not help, best test top-1",
        "allreduce",
        "allreduce_slowmo",
        "Sec. 6: no gain",
        "no_gain",
    ),
)
TRANSLATION_CLAIMS = (
    Claim("Local Adam -> + SlowMo, test BLEU", "localsgd", "localsgd_slowmo", "26.62 -> 27.14", score="bleu"),
    Claim("SGP -> + SlowMo, test BLEU", "sgp", "sgp_slowmo", "26.92 -> 27.84", score="bleu"),
    Claim("SGP + SlowMo beats AR-Adam, test BLEU", "allreduce", "sgp_slowmo", "27.17 < 27.84", score="bleu"),
    Claim("AR-Adam beats Local Adam, test BLEU", "localsgd", "allreduce", "26.62 < 27.17", score="bleu"),
)


def _cell(s: Stat | None, digits: int = 2) -> str:
    return s.fmt(digits) if s is not None else "–"


def _bytes(s: Stat | None) -> str:
    return f"{s.mean / 1e3:.1f} kB" if s is not None else "–"


def method_table(groups: dict[str, MethodRuns], paper: dict[str, str], translation: bool = False) -> str:
    first, second = (
        ("test2016 BLEU (final)", "best valid ppl") if translation else ("best test top-1", "final test top-1")
    )
    rows = []
    for key, g in groups.items():
        a, b = (g.final_bleu(), g.best()) if translation else (g.best(), g.final_metric())
        rows.append(
            [
                g.label,
                len(g.runs),
                _cell(a),
                _cell(b),
                _cell(g.final_loss(), 3),
                _cell(g.ms_per_step(), 1),
                _bytes(g.bytes_per_step()),
                paper.get(key, "–"),
            ]
        )
    return markdown_table(
        ["method", "seeds", first, second, "final train loss", "ms / iter", "bytes sent / iter", "paper"], rows
    )


#: the columns of every table of the paper's claims
def sweep_grid(groups: dict[str, MethodRuns]) -> list[list[float | None]]:
    """best top-1, rows = beta, columns = tau."""
    return best_grid(groups, [[f"beta{beta:g}_tau{tau}" for tau in SWEEP_TAUS] for beta in SWEEP_BETAS])


def sweep_section(groups: dict[str, MethodRuns], noise: float | None) -> list[str]:
    grid = sweep_grid(groups)
    out = [
        markdown_table(
            ["beta \\ tau", *SWEEP_TAUS],
            [[f"{beta:g}", *("–" if v is None else f"{v:.2f}" for v in row)] for beta, row in zip(SWEEP_BETAS, grid)],
        )
    ]
    ms = {
        tau: stat([s.mean for b in SWEEP_BETAS if (g := groups.get(f"beta{b:g}_tau{tau}")) and (s := g.ms_per_step())])
        for tau in SWEEP_TAUS
    }
    by = {
        tau: stat(
            [s.mean for b in SWEEP_BETAS if (g := groups.get(f"beta{b:g}_tau{tau}")) and (s := g.bytes_per_step())]
        )
        for tau in SWEEP_TAUS
    }
    out += [
        "",
        "ms / iter (mean over beta): "
        + ", ".join(f"tau {t}: {_cell(ms[t], 1)}" for t in SWEEP_TAUS)
        + "; bytes sent / iter: "
        + ", ".join(f"tau {t}: {_bytes(by[t])}" for t in SWEEP_TAUS)
        + ".",
    ]
    # claims: beta in 0.4-0.8 beats beta = 0 (mean over taus); tau 6 is more accurate than tau 24
    col = lambda betas, tau: [grid[SWEEP_BETAS.index(b)][SWEEP_TAUS.index(tau)] for b in betas]  # noqa: E731
    with_mom = stat([v for t in SWEEP_TAUS for v in col(SWEEP_BETAS[1:], t) if v is not None])
    without = stat([v for t in SWEEP_TAUS for v in col(SWEEP_BETAS[:1], t) if v is not None])
    small = stat([v for v in col(SWEEP_BETAS, SWEEP_TAUS[0]) if v is not None])
    large = stat([v for v in col(SWEEP_BETAS, SWEEP_TAUS[-1]) if v is not None])
    pt = lambda s: Stat(s.mean, None, s.n) if s else None  # noqa: E731  (spread over cells is not seed noise)
    v1, t1 = verdict(pt(without), pt(with_mom), noise=noise)
    v2, t2 = verdict(pt(large), pt(small), noise=noise)
    out += [
        "",
        markdown_table(
            CLAIM_HEADER,
            [
                ["beta in 0.4-0.8 beats beta = 0 (mean over tau), best top-1", "Sec. 6, Fig. 3", t1, f"**{v1}**"],
                [
                    f"tau {SWEEP_TAUS[0]} more accurate than tau {SWEEP_TAUS[-1]} (mean over beta), best top-1",
                    "Sec. 6: tau trades speed for accuracy",
                    t2,
                    f"**{v2}**",
                ],
            ],
        ),
    ]
    return out


def streamed_section(exact: dict[str, MethodRuns], streamed: dict[str, MethodRuns]) -> list[str]:
    rows = []
    for key in ("localsgd_slowmo", "sgp_slowmo"):
        e, s = exact.get(key), streamed.get(f"{key}_streamed")
        eb, sb = (e.best() if e else None), (s.best() if s else None)
        ef, sf = (e.final_metric() if e else None), (s.final_metric() if s else None)
        db = sb.mean - eb.mean if eb and sb else None
        df = sf.mean - ef.mean if ef and sf else None
        ok = (
            "–"
            if db is None or df is None
            else ("yes" if abs(db) <= 0.5 and abs(df) <= 0.5 else "no: better" if min(db, df) > 0 else "no")
        )
        label = (e or s).label if (e or s) else key
        rows.append(
            [
                label,
                _cell(eb),
                _cell(sb),
                "–" if db is None else f"{db:+.2f}",
                _cell(ef),
                _cell(sf),
                "–" if df is None else f"{df:+.2f}",
                ok,
            ]
        )
    return [
        markdown_table(
            [
                "method",
                "exact best",
                "streamed best",
                "diff best",
                "exact final",
                "streamed final",
                "diff final",
                "within 0.5",
            ],
            rows,
        )
    ]


def diagnostics_section(translation: dict[str, MethodRuns], diagnostics: dict[str, MethodRuns]) -> list[str]:
    """The diagnostic runs beside the translation rows they vary (not part of any verdict)."""
    out = [
        "### Diagnosis: SlowMo on Multi30k with beta = 0 or half the lr (one seed; not part of the verdicts)",
        "",
        "The translation command with one change each: "
        + "; ".join(f"{m.label}: `{' '.join(m.extra)}`" for m in DIAGNOSTIC_METHODS)
        + ". The rows above them are the "
        "translation set's (mean over its seeds).",
        "",
    ]
    if not diagnostics:
        return out + ["No finished runs yet: `scripts/reproduce.py diagnostics`.", ""]
    rows = {k: translation[k] for k in ("sgp", "sgp_slowmo", "localsgd", "localsgd_slowmo") if k in translation}
    rows.update(diagnostics)
    return out + [method_table(rows, TRANSLATION_PAPER, translation=True), ""]


def streamed_parts_section(
    exact: dict[str, MethodRuns], streamed: dict[str, MethodRuns], parts: dict[str, MethodRuns]
) -> list[str]:
    if not parts:
        return ["No finished runs yet: `scripts/reproduce.py streamed_parts`."]
    ref = exact.get("localsgd_slowmo")
    ref_best = ref.best() if ref else None
    rows = [("exact (Alg. 1)", ref_best)] + [
        (m.label.split(", ", 1)[1], parts[m.key].best() if m.key in parts else None) for m in STREAMED_PARTS
    ]
    if "localsgd_slowmo_streamed" in streamed:
        rows.append(("all three", streamed["localsgd_slowmo_streamed"].best()))
    cells = []
    for label, best in rows:
        diff = f"{best.mean - ref_best.mean:+.2f}" if best and ref_best and label != "exact (Alg. 1)" else "–"
        cells.append([label, _cell(best), diff])
    return [markdown_table(["Local SGD + SlowMo", "best test top-1", "diff to exact"], cells)]


def machine_line(runs_dir: Path) -> str:
    for name in SETS:
        p = runs_dir / name / "machine.json"
        if p.exists():
            m = json.loads(p.read_text())
            return (
                f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('os')}, Python {m.get('python')}, "
                f"torch {m.get('torch')}; gloo on CPU, 4 worker processes with one thread each."
            )
    return "Machine: unknown (no machine.json in the run directories)."


def render(runs_dir: Path, img_dir: Path, img_ref: str = "img") -> str:
    """The Markdown of the reproduction region; writes the plots to img_dir."""
    cifar, streamed = load_set("cifar", runs_dir), load_set("streamed", runs_dir)
    sweep, translation = load_set("sweep", runs_dir), load_set("translation", runs_dir)
    shown = runs_dir.relative_to(REPO) if runs_dir.is_relative_to(REPO) else runs_dir  # the docs stay portable
    out = [
        f"_Generated by `scripts/reproduce.py report` from the run directories in `{shown}`; do not edit by hand._",
        "",
        "The SlowMo paper's comparisons (Wang et al., ICLR 2020, arXiv:1910.00643, Table 1 and Sec. 6) at "
        "CPU scale: the same step budget, schedule shape and hyper-parameters for every method of a set (no "
        "per-method tuning; SlowMo's alpha, beta and tau are those of `configs/exp/`). Numbers are mean ± "
        "sample standard deviation over seeds. A claim **reproduces** when the measured mean difference has "
        "the paper's sign and exceeds the spread sqrt(sd_a² + sd_b²); it is **not resolved** when the "
        "difference is within the spread (or only one seed exists); otherwise it **does not reproduce**. "
        "The models are ~100x smaller and trained ~100x shorter than the paper's, so absolute numbers are "
        "not comparable; only the orderings are.",
        "",
        machine_line(runs_dir),
        "",
        "Commands (the first trains every set, skipping finished runs; the second rewrites this region):",
        "",
        "```",
        ".venv/bin/python scripts/reproduce.py all",
        ".venv/bin/python scripts/reproduce.py report",
        "```",
        "",
    ]
    for set_name in ("cifar", "translation", "sweep"):
        rs = SETS[set_name]
        out += [
            f"`{set_name}` set: {rs.description}; {len(rs.methods)} methods x seeds "
            f"{', '.join(map(str, rs.seeds))}; every run is the command below with its own `+exp=`, `seed=`, "
            "`output_dir=`"
            + (", `slowmo.beta`, `slowmo.tau`, `algorithm.period`" if set_name == "sweep" else "")
            + ":",
            "",
            "```",
            portable(" ".join(plan(set_name)[0].command(shown))),
            "```",
            "",
        ]
    out += ["### CIFAR-10 (Table 1, top)", ""]
    if cifar:
        out += [method_table(cifar, CIFAR_PAPER), ""]
        table, _ = claims_table(cifar, CIFAR_CLAIMS, more=[loss_claim(cifar)])
        out += [table, ""]
        plot_curves(cifar, img_dir / "reproduce_cifar.png", "top1", "test top-1 (%)")
        out += [f"![CIFAR-10 curves]({img_ref}/reproduce_cifar.png)", ""]
    else:
        out += ["No finished runs yet: `scripts/reproduce.py cifar`.", ""]
    out += ["### Multi30k En-De (Table 1, WMT16 column at CPU scale)", ""]
    if translation:
        out += [method_table(translation, TRANSLATION_PAPER, translation=True), ""]
        table, _ = claims_table(translation, TRANSLATION_CLAIMS)
        out += [table, ""]
        plot_curves(translation, img_dir / "reproduce_translation.png", "ppl", "valid perplexity")
        out += [f"![translation curves]({img_ref}/reproduce_translation.png)", ""]
    else:
        out += ["No finished runs yet: `scripts/reproduce.py translation`.", ""]
    out += ["### Sensitivity: Local SGD + SlowMo, beta x tau (one seed; best test top-1)", ""]
    if sweep:
        ref = cifar.get("localsgd_slowmo")
        noise = ref.best().sd if ref and ref.best() else None
        out += sweep_section(sweep, noise)
        out += [
            "",
            "The one-seed sweep's spread is that of Local SGD + SlowMo over seeds in the CIFAR-10 set "
            f"({'n/a' if noise is None else f'{noise:.2f}'}).",
            "",
        ]
        plot_heatmap(sweep_grid(sweep), img_dir / "reproduce_sweep.png")
        out += [f"![beta x tau]({img_ref}/reproduce_sweep.png)", ""]
    else:
        out += ["No finished runs yet: `scripts/reproduce.py sweep`.", ""]
    out += diagnostics_section(translation, load_set("diagnostics", runs_dir))
    out += [
        "### Streamed vs exact SlowMo",
        "",
        "`" + " ".join(STREAMED) + "` against the exact runs of the CIFAR-10 set (same seeds); goal: within "
        "0.5 points of test top-1.",
        "",
    ]
    out += streamed_section(cifar, streamed) if streamed else ["No finished runs yet: `scripts/reproduce.py streamed`."]
    out += ["", "One option at a time (Local SGD + SlowMo; best test top-1, difference to exact SlowMo):", ""]
    out += streamed_parts_section(cifar, streamed, load_set("streamed_parts", runs_dir))
    return "\n".join(out).rstrip() + "\n"


def replace_region(document: str, body: str, markers: tuple[str, str, str] = (BEGIN, END, HEADING)) -> str:
    """Replace the text between the markers; append heading and markers when absent."""
    begin, end, heading = markers
    if begin in document and end in document and document.index(begin) < document.index(end):
        head, rest = document.split(begin, 1)
        _, tail = rest.split(end, 1)
        return f"{head}{begin}\n{body}{end}{tail}"
    return f"{document.rstrip()}\n\n{heading}\n\n{begin}\n{body}{end}\n"


#: the 4-worker sets of this module's region (the regime sets have a region of their own)
FOUR_WORKER_SETS = ("cifar", "streamed", "streamed_parts", "sweep", "translation", "diagnostics")


def write_report(runs_dir: Path, results: Path, img_dir: Path) -> None:
    """Rewrite each region whose sets have finished runs here; a region with none keeps its text (the
    runs of another machine or session)."""
    text = results.read_text() if results.exists() else "# Results\n"
    img_ref = os.path.relpath(img_dir, results.parent)
    shown = runs_dir.relative_to(REPO) if runs_dir.is_relative_to(REPO) else runs_dir
    written = []
    if any(load_set(s, runs_dir) for s in regime.REGIME_SETS):
        body = regime.render(runs_dir, img_dir, shown, img_ref, CIFAR_PAPER, CIFAR_CLAIMS)
        text = replace_region(text, body, (regime.BEGIN, regime.END, regime.HEADING))
        written.append("regime_*.png")
    timed = time_report.render(img_dir, img_ref)
    if timed is not None:
        text = replace_region(text, timed, (time_report.BEGIN, time_report.END, time_report.HEADING))
        written.append("time_to_accuracy*.png")
    for name, small in regime.SMALL_REGIONS.items():
        if load_set(name, runs_dir):
            text = replace_region(text, regime.render_small(name, runs_dir, shown), small.markers)
    if any(load_set(s, runs_dir) for s in FOUR_WORKER_SETS):
        text = replace_region(text, render(runs_dir, img_dir, img_ref))
        written.append("reproduce_*.png")
    results.write_text(text)
    print(f"wrote {results}" + (f" and {img_dir}/{{{','.join(written)}}}" if written else " (no finished runs)"))
