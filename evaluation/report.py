"""Write a run's results: results.json, results.md, a per-task bar chart and a confusion matrix.

Output folder::

    results.json          settings, per-group metrics with n and 95% CIs, overall, confusion, per-item records
    results.md            the table below plus notes
    metrics.png           one bar per group (accuracy, or WER for transcription), 95% CI as error bars
    confusion_classification.png   reference x predicted label counts (only with classification items)

Table rows: one per group and metric (accuracy; WER and CER for transcription; format compliance
for format tasks; right tool, arguments exact and schema-valid for tool-call steps), then the overall rows. Intervals: Wilson for accuracies, item bootstrap
(1000 resamples, seed 0) for WER.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from omnivox.evaluation.runner import EvalResults

log = logging.getLogger(__name__)

TABLE_HEADER = ("task", "metric", "n", "value", "95% CI")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def table_rows(results: EvalResults) -> list[tuple[str, str, str, str, str]]:
    """Rows of the results table (strings), groups in order of appearance, then the overall rows."""
    rows: list[tuple[str, str, str, str, str]] = []
    for group, m in results.metrics.items():
        metric = m["metric"].upper() if m["metric"] == "wer" else m["metric"]
        if group.startswith("task_calls"):
            metric = "right tool or rightly none"
        rows.append((group, metric, str(m["n"]), _pct(m["value"]), _ci(m["ci95"])))
        if "cer" in m:
            rows.append((group, "CER", str(m["n"]), _pct(m["cer"]["value"]), ""))
        if "compliance" in m:
            rows.append((group, "format compliance", str(m["n"]), _pct(m["compliance"]["value"]), _ci(m["compliance"]["ci95"])))
        rows += _tool_call_rows(group, m)
    names = {
        "accuracy": "accuracy (all answers)", "accuracy_macro": "accuracy (mean over rows)",
        "format_compliance": "format compliance (all formats)", "format_accuracy": "format accuracy (all formats)",
        "wer": "WER (all transcriptions)",
    }  # fmt: skip
    for key, m in results.overall.items():
        n = f"{m['n']} rows" if key == "accuracy_macro" else str(m["n"])
        rows.append(("**overall**", names[key], n, _pct(m["value"]), _ci(m.get("ci95"))))
        if key == "accuracy":
            rows += _tool_call_rows("**overall**", m, "all ")
    return rows


def _tool_call_rows(group: str, m: dict[str, Any], every: str = "") -> list[tuple[str, str, str, str, str]]:
    """Rows for the tool-call measures of a group (task-calls suite): arguments and schema validity."""
    names = {"arguments": f"arguments exact ({every}steps with calls)", "schema_valid": f"schema-valid ({every}steps the model called)"}
    return [(group, names[key], str(m[key]["n"]), _pct(m[key]["value"]), _ci(m[key]["ci95"])) for key in names if key in m]


def _transcriber(settings: dict | None) -> str:
    if not settings:
        return "transcripts by the LLM"
    return (
        f"transcripts chosen among Whisper's {settings['beam_size']} best and the LLM's (weights Whisper "
        f"{settings['whisper_weight']}, LLM {settings['llm_weight']}, CTC {settings['ctc_rescore_weight']})"
    )


def markdown(results: EvalResults) -> str:
    """results.md: a title line, the table, and notes."""
    lines = [
        f"# omnivox eval: suite `{results.suite}`, split `{results.split}`",
        "",
        f"model: `{results.model}`; data: `{results.data}`; decoding: beams {results.settings.get('num_beams')}, "
        f"max {results.settings.get('max_new_tokens')} new tokens, CTC fusion weight in transcripts "
        f"{results.settings.get('ctc_fusion_weight', 0.0)}; {_transcriber(results.settings.get('transcriber'))}",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join(["---", "---", "---:", "---:", "---:"]) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    if results.notes:
        lines += ["", *[f"- {note}" for note in results.notes]]
    return "\n".join(lines) + "\n"


def print_table(results: EvalResults, console=None) -> None:
    """The results table in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"omnivox eval: {results.suite} ({results.split})")
    for i, name in enumerate(TABLE_HEADER):
        table.add_column(name, justify="right" if i >= 2 else "left")
    for row in table_rows(results):
        table.add_row(*[cell.replace("**", "") for cell in row])
    console.print(table)
    for note in results.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def plot_metrics(metrics: dict[str, dict[str, Any]], path: Path) -> Path:
    """Horizontal bar per group with its 95% CI; accuracy and WER share a 0-100% axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g for g, m in metrics.items() if m["value"] is not None]
    values = [100 * metrics[g]["value"] for g in names]
    lows = [v - 100 * metrics[g]["ci95"][0] if metrics[g]["ci95"] else 0.0 for g, v in zip(names, values, strict=True)]
    highs = [100 * metrics[g]["ci95"][1] - v if metrics[g]["ci95"] else 0.0 for g, v in zip(names, values, strict=True)]
    colours = ["tab:red" if metrics[g]["metric"] == "wer" else "tab:blue" for g in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    ypos = list(range(len(names)))
    ax.barh(ypos, values, xerr=[lows, highs], color=colours, capsize=3)
    ax.set_yticks(ypos, [f"{g} ({metrics[g]['metric']})" for g in names])
    ax.invert_yaxis()
    ax.set_xlim(0, max(100.0, *[v + h for v, h in zip(values, highs, strict=True)]) + 12)
    ax.set_xlabel("% (accuracy: higher is better; WER: lower is better)")
    for y, v, h in zip(ypos, values, highs, strict=True):
        ax.text(v + h + 1.5, y, f"{v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(labels: list[str], matrix: list[list[int]], path: Path, title: str = "classification") -> Path:
    """Counts as an image: rows = reference label, columns = predicted label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for r, row in enumerate(matrix):
        for c, count in enumerate(row):
            ax.text(c, r, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(results: EvalResults, out: Path) -> dict[str, Path]:
    """Write all files to ``out`` (created); returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.json": out / "results.json", "results.md": out / "results.md"}
    files["results.json"].write_text(json.dumps(results.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files["results.md"].write_text(markdown(results), encoding="utf-8")
    if results.metrics:
        files["metrics.png"] = plot_metrics(results.metrics, out / "metrics.png")
    for task, conf in results.confusion.items():
        name = f"confusion_{task}.png"
        files[name] = plot_confusion(conf["labels"], conf["matrix"], out / name, title=task)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return files


def plot_spectrograms(columns: list[list[tuple[str, np.ndarray, int]]], path: Path, max_seconds: float = 8.0) -> Path:
    """Log-spectrograms in a grid: one column per entry of ``columns``, each a list of
    ``(title, samples [S], sample_rate)`` drawn top to bottom (e.g. before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(c) for c in columns)
    fig, axes = plt.subplots(rows, len(columns), figsize=(4.5 * len(columns), 3 * rows), squeeze=False)
    for col, column in enumerate(columns):
        for row in range(rows):
            ax = axes[row, col]
            if row >= len(column):
                ax.axis("off")
                continue
            title, audio, rate = column[row]
            audio = np.asarray(audio, dtype=np.float64)[: int(rate * max_seconds)]
            audio = audio + 1e-6 * np.random.default_rng(0).standard_normal(audio.size)  # digital silence: no log(0)
            nfft = 512 if rate <= 16_000 else 1024
            ax.specgram(audio, NFFT=nfft, Fs=rate, noverlap=nfft * 3 // 4, cmap="magma")
            ax.set_title(title[:48], fontsize=9)
            ax.set_xlabel("s")
            ax.set_ylabel("Hz")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
