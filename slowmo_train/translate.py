"""Translate text with a trained wmt16 model: one input sentence a line in, one translation a line out.

    echo "A dog runs on the beach." | slowmo-translate outputs/2026-11-22/03-30-00_wmt16_small_cpu
    slowmo-translate RUN_DIR --input test.en --beam 4 > test.hyp.de
    slowmo-translate RUN_DIR/model_final.pt --input test.en
    slowmo-translate RUN_DIR/checkpoints/step_00000500 --input test.en   # the ranks' models, averaged

A run directory holds everything needed: ``config.yaml`` (model preset, width, evaluation settings),
``artifacts/spm.model`` (the joint sentencepiece vocabulary the task recorded) and
``model_final.pt`` (the workers' averaged model, saved at the end of training). A checkpoint
directory's rank files are averaged, as the trainer averages the workers before evaluating.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slowmo_train.beam_search import beam_search
from slowmo_train.config import JobConfig, to_job_config
from slowmo_train.data import subword
from slowmo_train.data.vocab import EOS, PAD
from slowmo_train.models import build_model

FINAL_MODEL = "model_final.pt"


class TranslateError(RuntimeError):
    """A path or file cannot be used; printed as one line."""


def _find_run_dir(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise TranslateError(
        f"no config.yaml in {path} or its parents: pass a slowmo-train run directory "
        f"(or a model_final.pt / checkpoint inside one)"
    )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a run dir (model_final.pt), a .pt file, or a checkpoint dir (ranks averaged)."""
    if path.is_dir() and (path / FINAL_MODEL).is_file():
        path = path / FINAL_MODEL
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.is_dir() and (path / "manifest.json").is_file():
        from slowmo_train.checkpoint import load_rank_state

        states = []
        manifest, _ = load_rank_state(path, 0)
        for rank in range(int(manifest["world_size"])):
            states.append(load_rank_state(path, rank)[1]["model"])
        return {
            k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype)
            if states[0][k].is_floating_point()
            else states[0][k]
            for k in states[0]
        }
    raise TranslateError(
        f"{path} holds no {FINAL_MODEL} and is not a checkpoint directory: the run may not have "
        "finished; pass a checkpoint (RUN_DIR/checkpoints/step_*) instead"
    )


def load_translator(path: str | Path, spm_model: str | None = None):
    """(model in eval mode, sentencepiece processor, job config) for a run dir / model file / checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TranslateError(f"{path} does not exist")
    run_dir = _find_run_dir(path if path.is_dir() else path.parent)
    job: JobConfig = to_job_config(OmegaConf.load(run_dir / "config.yaml"))
    if job.task.name != "wmt16":
        raise TranslateError(f"{run_dir} is a {job.task.name} run; slowmo-translate needs a wmt16 run")
    if spm_model is None:
        found = sorted((run_dir / "artifacts").glob("*.model"))
        if not found:
            raise TranslateError(f"{run_dir}/artifacts holds no sentencepiece .model file; pass --spm PATH")
        spm_model = str(found[0])
    sp = subword.load(spm_model)
    model = build_model(job.model, "wmt16", vocab_size=sp.get_piece_size())
    state = _load_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise TranslateError(
            f"the weights at {path} do not fit {job.model.arch} with vocabulary "
            f"{sp.get_piece_size()} ({str(err).splitlines()[0]})"
        ) from None
    return model.eval(), sp, job


def translate_lines(
    model, sp, lines: list[str], beam: int, lenpen: float, max_len_a: float, max_len_b: int, batch_sentences: int = 32
) -> list[str]:
    """Translations of ``lines``, in order (batched by length for speed)."""
    encoded = [sp.encode(line.strip()) + [EOS] for line in lines]
    order = sorted(range(len(lines)), key=lambda i: len(encoded[i]))
    out = [""] * len(lines)
    for start in range(0, len(order), batch_sentences):
        chunk = order[start : start + batch_sentences]
        src = torch.full((len(chunk), max(len(encoded[i]) for i in chunk)), PAD, dtype=torch.long)
        for row, i in enumerate(chunk):
            src[row, : len(encoded[i])] = torch.tensor(encoded[i])
        for i, hyp in zip(chunk, beam_search(model, src, beam, lenpen, max_len_a, max_len_b)):
            out[i] = sp.decode(hyp)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slowmo-translate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="run directory, model_final.pt, or checkpoint directory of a wmt16 run")
    p.add_argument("--input", help="text file, one sentence a line (default: stdin)")
    p.add_argument("--spm", help="sentencepiece model (default: RUN_DIR/artifacts/*.model)")
    p.add_argument("--beam", type=int, help="beam size (default: the run's eval.beam)")
    p.add_argument("--lenpen", type=float, help="length penalty (default: the run's eval.lenpen)")
    p.add_argument("--max-len-a", type=float, help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int)
    p.add_argument("--batch", type=int, default=32, help="sentences per beam-search batch")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, sp, job = load_translator(args.path, args.spm)
        if args.input:
            try:
                lines = Path(args.input).read_text(encoding="utf-8").splitlines()
            except OSError as err:
                raise TranslateError(f"cannot read --input {args.input}: {err.strerror or err}") from None
        else:
            lines = sys.stdin.read().splitlines()
    except TranslateError as err:
        print(f"slowmo-translate: error: {err}", file=sys.stderr)
        sys.exit(2)
    e = job.eval
    beam = args.beam or e.beam
    if beam < 1 or args.batch < 1:
        print("slowmo-translate: error: --beam and --batch must be >= 1", file=sys.stderr)
        sys.exit(2)
    hyps = translate_lines(
        model,
        sp,
        lines,
        beam,
        e.lenpen if args.lenpen is None else args.lenpen,
        e.max_len_a if args.max_len_a is None else args.max_len_a,
        e.max_len_b if args.max_len_b is None else args.max_len_b,
        args.batch,
    )
    for hyp in hyps:
        print(hyp)


if __name__ == "__main__":
    main()
