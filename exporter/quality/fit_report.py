"""The report's section on a --fit search: the budget, what the search measured and chose, and every file's
mean KLD on the held-out windows (text the search never scored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.core.units import human_size, mib


def fit_markdown(data: dict[str, Any]) -> list[str]:
    fit = data["fit"]
    reach = fit["reach"]
    lines = [
        "",
        f"## Fitted to {human_size(fit['budget_bytes'])}",
        "",
        f"`{fit['profile']}` holds the types the search chose; `{fit['profile_file']}` rebuilds it byte for "
        f"byte (`--profile-file {fit['profile_file']} --profile {fit['profile']}`). Mixes of the ladder reach "
        f"{human_size(reach['smallest'])} to {human_size(reach['largest'])} for this model. The search ran "
        f"{fit['trials']} trials costing {fit['trial_seconds']:.0f} s ({fit['trials_measured']} measured in this run, "
        f"the rest from the cache) over {len(fit['groups'])} tensor groups in {fit['bands']} band(s) of layers, "
        f"scoring the evaluation windows {_windows(fit['searched_windows'])}; it predicted "
        f"{mib(fit['predicted_bytes'])} and a mean KLD of {fit['predicted_kld']:.5f} there.",
        "",
        f"Held out (windows {_windows(fit['held_out_windows'])}, never scored by the search):",
        "",
        "| file | size | fits | held-out mean KLD | held-out top-1 |",
        "|---|---:|---|---:|---:|",
    ]
    for row in data["artifacts"]:
        m = row["metrics"]
        if "held_out_mean_kld" not in m:
            continue
        fits = "yes" if row["size_bytes"] <= fit["budget_bytes"] else "no"
        lines.append(
            f"| {Path(row['path']).name if row['path'] else row['label']} | {mib(row['size_bytes'])} | {fits} | "
            f"{m['held_out_mean_kld']:.5f} | {m['held_out_top1']:.2%} |"
        )
    lines += [
        "",
        "| tensor group | tensors | type asked | written | size | measured cost (ΔKLD vs Q8_0) |",
        "|---|---:|---|---|---:|---:|",
    ]
    for group in fit["groups"]:
        lines.append(
            f"| {group['group']} | {group['tensors']} | {group['type']} | {', '.join(group['written'])} | "
            f"{mib(group['bytes'])} | "
            f"{group['cost']:+.5f} |"
        )
    return [*lines, ""]


def _windows(windows: list[int]) -> str:
    return ", ".join(str(w) for w in windows[:12]) + (", …" if len(windows) > 12 else "")
