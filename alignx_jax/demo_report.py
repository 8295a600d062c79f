"""The `alignx demo` report: results against the paper's numbers and the issue's targets
(`check_targets`), OUT/report.md, the accuracy and training-curve figures, and the JSON / markdown /
PNG writers the demo's stages share (`demo_real` writes its report with them too)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignx_jax import paths

# The paper's alignment accuracy (docs/method.md section 8) beside each demo row: AlignX-test persona P
# for the synthetic users, P-SOUPS for the P-SOUPS split. None = the paper has no such row.
PAPER = {
    "synthetic": {
        "base": ("Llama-3-8B-Instruct", 48.84),
        "non_personalized": (None, None),
        "ica": ("ICA, full", 75.19),
        "pba_predicted": ("PBA, full", 71.10),
        "pba_golden": ("PBA with golden P~", 91.36),
    },
    "p_soups": {
        "non_personalized": (None, None),
        "ica": ("ICA, full", 63.33),
        "pba_profile": ("PBA, full", 81.69),
    },
}
TARGETS = (
    "pba_golden >= 0.80",
    "ica >= non_personalized + 0.10",
    "non_personalized <= 0.60",
    "p-soups: ica > non_personalized",
    "p-soups: pba_profile > non_personalized",
)


def write_json(path: str, obj: Any) -> None:
    paths.write_all(
        {path: (json.dumps(obj, indent=2) + "\n").encode("utf-8")}
    )  # a stage's marker: whole or absent


def write_lines(path: str, lines: Sequence[str]) -> str:
    """A report file (markdown) written whole from its lines; returns its path."""
    paths.write_all(
        {path: "\n".join(lines).encode("utf-8")}
    )  # the earlier report or this one, never a cut one
    return path


def save_figure(fig: Any, path: str) -> str:
    """A matplotlib figure written as PNG and closed; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    paths.write_all({path: png.getvalue()})
    return path


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def check_targets(results: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's targets, each True/False (None where a number is missing)."""
    s, p = results.get("synthetic", {}), results.get("p_soups", {})

    def acc(block, key):
        return (block.get(key) or {}).get("accuracy")

    def cmp(fn, *xs):
        return None if any(x is None for x in xs) else bool(fn(*xs))

    return {
        TARGETS[0]: cmp(lambda g: g >= 0.80, acc(s, "pba_golden")),
        TARGETS[1]: cmp(lambda i, n: i >= n + 0.10, acc(s, "ica"), acc(s, "non_personalized")),
        TARGETS[2]: cmp(lambda n: n <= 0.60, acc(s, "non_personalized")),
        TARGETS[3]: cmp(lambda i, n: i > n, acc(p, "ica"), acc(p, "non_personalized")),
        TARGETS[4]: cmp(lambda i, n: i > n, acc(p, "pba_profile"), acc(p, "non_personalized")),
    }


def write_report(out: str, results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        "# alignx demo: the paper's result at small scale",
        "",
        f"Command: `alignx demo --out {out}{' --quick' if info.get('quick') else ''} --seed {info.get('seed')}`"
        f" ({results['seconds']:.0f} s wall).",
        "",
        "Alignment accuracy (%) of each method on held-out data, with its 95% Wilson interval, beside the",
        "paper's number for the nearest row (docs/method.md section 8: AlignX-test persona P for the synthetic",
        "users, P-SOUPS for P-SOUPS). The tiny model is trained from random init for minutes on a CPU:",
        "compare the ordering of the methods, not the absolute numbers.",
        "",
    ]
    for block, title in (
        ("synthetic", "Synthetic users (held out)"),
        ("p_soups", "P-SOUPS (held-out prompts)"),
    ):
        entries = results.get(block) or {}
        lines += [f"## {title}", ""]
        if block == "p_soups" and entries.get("skipped"):
            lines += [f"Skipped: {entries['skipped']}", ""]
            continue
        if block == "p_soups":
            lines += [
                f"File: `{entries.get('file')}`",
                "",
                "The tiny model cannot read real text: its tokenizer and its 0.66M random-init parameters",
                "were made for the synthetic world, so these rows stay near chance. For a real model",
                "personalized on P-SOUPS run `make demo-real` (`alignx demo --real`).",
                "",
            ]
        lines += ["| method | demo accuracy | n | 95% CI | paper row | paper |", "|---|---|---|---|---|---|"]
        for key, (paper_row, paper_acc) in PAPER[block].items():
            e = entries.get(key)
            if not e:
                continue
            lo, hi = e["ci95"]
            lines.append(
                f"| {key} | {pct(e['accuracy'])} | {e['n']} | [{pct(lo)}, {pct(hi)}] | "
                f"{paper_row or '-'} | {'-' if paper_acc is None else f'{paper_acc:.2f}'} |"
            )
        lines.append("")
    lines += ["## Targets (issue 8)", ""]
    for name, ok in check_targets(results).items():
        lines.append(f"- {'PASS' if ok else ('FAIL' if ok is False else 'n/a')}: {name}")
    lines += ["", "## Setup", "", "```", json.dumps(info, indent=2), "```", ""]
    return write_lines(os.path.join(out, "report.md"), lines)


def plot_accuracy(out: str, results: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [(b, results.get(b) or {}) for b in ("synthetic", "p_soups")]
    blocks = [(b, e) for b, e in blocks if any(isinstance(v, dict) and "accuracy" in v for v in e.values())]
    fig, axes = plt.subplots(1, max(1, len(blocks)), figsize=(5.5 * max(1, len(blocks)), 4), squeeze=False)
    for ax, (block, entries) in zip(axes[0], blocks):
        keys = [
            k
            for k in PAPER[block]
            if isinstance(entries.get(k), dict) and entries[k].get("accuracy") is not None
        ]
        acc = np.array([entries[k]["accuracy"] for k in keys])
        lo = np.array([entries[k]["ci95"][0] for k in keys])
        hi = np.array([entries[k]["ci95"][1] for k in keys])
        ax.bar(
            range(len(keys)),
            100 * acc,
            yerr=100 * np.stack([acc - lo, hi - acc]),
            capsize=4,
            color=["#999999" if k in ("base", "non_personalized") else "#3b75af" for k in keys],
        )
        ax.axhline(50, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=20, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("alignment accuracy (%)")
        ax.set_title({"synthetic": "held-out synthetic users", "p_soups": "P-SOUPS, held-out prompts"}[block])
    return save_figure(fig, os.path.join(out, "accuracy.png"))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """W/metrics.jsonl rows by step (a resumed run's repeated steps keep the last row)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows: dict[int, dict] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if "step" in r:
                        rows[int(r["step"])] = r
    return [rows[s] for s in sorted(rows)]


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    if len(x) < k or k <= 1:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def plot_curves(out: str, workdirs: dict[str, str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, w in workdirs.items():
        rows = read_metrics(w)
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        k = max(1, len(rows) // 20)  # a moving average: single batches of a few pairs are noisy
        for ax, key in zip(axes, ("loss", "rewards/accuracies")):
            # TRL's metric names; "reward_accuracy" is the name in workdirs of earlier versions
            y = _smooth(np.array([r.get(key, r.get("reward_accuracy")) for r in rows], dtype=np.float64), k)
            # markers where there are few points: a one-step run (--quick) is a dot, not an invisible line
            ax.plot(steps[len(steps) - len(y) :], y, label=name, marker="o" if len(y) < 10 else None)
    axes[0].set_title("training loss: DPO + loss.sft_weight x chosen NLL")
    axes[1].set_title("reward accuracy (training batches)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    return save_figure(fig, os.path.join(out, "curves.png"))


def format_table(results: dict[str, Any]) -> list[str]:
    lines = [f"{'data':<10} {'method':<18} {'acc %':>6}  {'n':>5}  95% CI"]
    for block in ("synthetic", "p_soups"):
        for key, e in (results.get(block) or {}).items():
            if isinstance(e, dict) and "accuracy" in e:
                lo, hi = e["ci95"]
                lines.append(
                    f"{block:<10} {key:<18} {pct(e['accuracy']):>6}  {e['n']:>5}  [{pct(lo)}, {pct(hi)}]"
                )
    return lines
