"""The flags of `merge-quantize --fit`: the budget (a size or bits per weight) and the bound on the search."""

from __future__ import annotations

from exporter.cli.option_groups import option, parse_size
from exporter.inputs.options import DEFAULT_FIT_TRIALS, FitOptions

__all__ = ["DEFAULT_FIT_TRIALS", "FIT_BPW_FLAG", "FIT_FLAG", "FIT_TRIALS_FLAG", "fit_options"]

FIT_FLAG = option(
    str | None,
    "--fit",
    help="Also write the most faithful GGUF no larger than this (e.g. 2.5GB, 120MiB): a type per tensor group "
    "chosen from measured costs against the unmerged model, written as <name>-FIT-<size>.gguf and a profile "
    "file that rebuilds it.",
)
FIT_BPW_FLAG = option(
    float | None, "--fit-bpw", help="Like --fit, with the budget in bits per weight of the file (e.g. 4.3)."
)
FIT_TRIALS_FLAG = option(
    int,
    "--fit-trials",
    min=2,
    help="Most trials (quantize + score) the --fit search runs; it takes the most bands of layers that fit.",
)


def fit_options(fit: str | None, fit_bpw: float | None, trials: int) -> FitOptions | None:
    """--fit / --fit-bpw / --fit-trials as options (None when neither budget is given)."""
    if fit is None and fit_bpw is None:
        return None
    if fit is not None:
        return FitOptions(
            fit,
            budget_bytes=parse_size(fit),
            bits_per_weight=None if fit_bpw is None else fit_bpw,
            max_trials=trials,
        )
    return FitOptions(f"{fit_bpw:g}", bits_per_weight=fit_bpw, max_trials=trials)
