"""Benchmark CSV -> readable results: a markdown report (``results.md``), PNG plots and the README's table.

    python -m bench.plot OUT/bench.csv [more.csv ...] --out DIR [--readme README.md]

``results.md`` starts with the date, device(s), commit(s) and versions the rows came from, then one table per
(op, dtype) with the median time and % of the physical floor per provider, peak-memory tables, the contrastive
max-batch table and the end-to-end training-step table. Cells whose correctness check did not pass say so.
``--readme`` replaces the section between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` with a compact
version (fwd_bwd only). PNGs need matplotlib; without it they are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from bench import common

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PROVIDER_ORDER = ("eager", "compile", "triton", "sdpa", "xformers", "eager+compile", "triton+compile")
MODE_ORDER = ("fwd", "bwd", "fwd_bwd", "step")

Row = dict[str, str]


def load(paths: Iterable[Path | str]) -> list[Row]:
    """Rows of several CSVs merged by the unique key (later files win)."""
    merged: dict[tuple[str, ...], Row] = {}
    for p in paths:
        for r in common.read_rows(p):
            merged[common.row_key(r)] = r
    return list(merged.values())


def _num(s: str) -> float | None:
    return float(s) if s not in ("", None) else None


def _ok(r: Row) -> bool:
    return r["correct"].startswith("pass")


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (preferred.index(v) if v in preferred else len(preferred), vals.index(v)))


def _status_word(correct: str) -> str:
    """Short cell text for a row without a usable number."""
    for word in ("unavailable", "oom", "error", "fail", "unchecked"):
        if correct.startswith(word):
            return {"unavailable": "n/a", "error": "error"}.get(word, word)
    return correct.split(":")[0] or "-"


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return f"{x:.3g}"


def header(rows: Sequence[Row]) -> list[str]:
    """Date, device, commit and versions of the rows (several values listed when runs were merged)."""

    def vals(col: str) -> str:
        return ", ".join(sorted({r[col] for r in rows})) or "-"

    stamps = sorted(r["timestamp"] for r in rows)
    date = f"{stamps[0]} … {stamps[-1]}" if stamps and stamps[0] != stamps[-1] else (stamps[0] if stamps else "-")
    return [
        f"Date (UTC): {date} · device: {vals('gpu')} · commit: {vals('git_sha')} · "
        f"torch {vals('torch')} · triton {vals('triton')}",
        "",
    ]


def _group(rows: Sequence[Row], *cols: str) -> dict[tuple[str, ...], list[Row]]:
    out: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for r in rows:
        out[tuple(r[c] for c in cols)].append(r)
    return out


def op_tables(rows: Sequence[Row], modes: Sequence[str] = MODE_ORDER) -> list[str]:
    """Per (op, dtype): rows (case, mode), one column per provider with ``p50 ms (x% floor)``."""
    lines: list[str] = []
    ops_rows = [r for r in rows if r["op"] != "train_step" and not r["case"].startswith("max-batch")]
    multi_gpu = len({r["gpu"] for r in ops_rows}) > 1
    for (gpu, op, dtype), grp in _group(ops_rows, "gpu", "op", "dtype").items():
        providers = _order((r["provider"] for r in grp), PROVIDER_ORDER)
        cells: dict[tuple[str, str, str], dict[str, Row]] = defaultdict(dict)
        for r in grp:
            cells[(r["case"], r["mode"], r["provider"])][r["metric"]] = r
        cases = list(dict.fromkeys(r["case"] for r in grp))
        present_modes = [m for m in _order((r["mode"] for r in grp), MODE_ORDER) if m in modes]
        if not present_modes:
            continue
        floor_unit = next((r["unit"] for r in grp if r["metric"] == "pct_floor"), "")
        lines += [
            f"### {op} · {dtype}" + (f" · {gpu}" if multi_gpu else ""),
            "",
            f"Median ms per call (in brackets: {floor_unit.replace('% of', '% of the floor,') or '% of floor'})."
            " ✗ = correctness check failed; n/a = provider not available; oom = out of memory.",
            "",
            "| case | mode | " + " | ".join(providers) + " |",
            "|---|---|" + "---|" * len(providers),
        ]
        for case in cases:
            for mode in present_modes:
                row_cells = []
                for p in providers:
                    m = cells.get((case, mode, p), {})
                    ms = m.get("ms")
                    if ms is None or _num(ms["p50"]) is None:
                        row_cells.append(_status_word(ms["correct"]) if ms else "")
                        continue
                    txt = f"{_fmt(float(ms['p50']))}"
                    if "pct_floor" in m and _num(m["pct_floor"]["p50"]) is not None:
                        pct = float(m["pct_floor"]["p50"])
                        txt += f" ({pct:.0f}%)" if pct >= 1 else " (<1%)"
                    if not _ok(ms):
                        txt += " ✗" if ms["correct"].startswith("fail") else f" ({_status_word(ms['correct'])})"
                    row_cells.append(txt)
                if any(row_cells):
                    lines.append(f"| {case} | {mode} | " + " | ".join(row_cells) + " |")
        mem = [r for r in grp if r["metric"] == "peak_mb" and r["mode"] == "fwd_bwd"]
        if mem:
            mcell = {(r["case"], r["provider"]): r for r in mem}
            lines += [
                "",
                f"Peak memory above the inputs, fwd_bwd (MiB) · {op} · {dtype}",
                "",
                "| case | " + " | ".join(providers) + " |",
                "|---|" + "---|" * len(providers),
            ]
            for case in cases:
                vals = [_fmt(float(mcell[(case, p)]["p50"])) if (case, p) in mcell else "" for p in providers]
                if any(vals):
                    lines.append(f"| {case} | " + " | ".join(vals) + " |")
        lines.append("")
    return lines


def max_batch_table(rows: Sequence[Row]) -> list[str]:
    mb = [r for r in rows if r["metric"] == "max_batch" and r["op"] != "train_step"]
    if not mb:
        return []
    peaks = {
        (r["op"], r["case"], r["provider"], r["dtype"], r["gpu"]): r
        for r in rows
        if r["metric"] == "peak_mb" and r["case"].startswith("max-batch")
    }
    lines = [
        "### Largest batch that fits (fwd_bwd)",
        "",
        "| op | case | dtype | provider | max B | peak MiB | stopped by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in mb:
        pk = peaks.get((r["op"], r["case"], r["provider"], r["dtype"], r["gpu"]))
        best = f"{int(float(r['p50'])):,}" if _num(r["p50"]) is not None else _status_word(r["correct"])
        stop = r["correct"].split("stop:", 1)[-1].strip() if "stop:" in r["correct"] else r["correct"]
        lines.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['provider']} | {best} | "
            f"{_fmt(float(pk['p50'])) if pk else ''} | {stop} |"
        )
    return lines + [""]


def train_table(rows: Sequence[Row]) -> list[str]:
    tr = [r for r in rows if r["op"] == "train_step"]
    if not tr:
        return []
    by = _group(tr, "gpu", "provider", "dtype")
    lines = [
        "### Training step (forward, both losses, backward, AdamW)",
        "",
        "| config | autocast | batch | images/s (p20–p80) | step ms | peak MiB | max batch | images/s at max | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rank = lambda p: PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER)  # noqa: E731
    for gpu, prov, dtype in sorted(by, key=lambda k: (k[0], rank(k[1]), k[2])):
        grp = by[(gpu, prov, dtype)]
        main = [r for r in grp if "max-batch" not in r["case"]]
        mx = {r["metric"]: r for r in grp if "max-batch" in r["case"]}
        m = {r["metric"]: r for r in main}
        ips = m.get("images_per_s")
        batch = json.loads(ips["dims_json"]).get("B", "") if ips else ""
        if ips and _num(ips["p50"]) is not None:
            ips_txt = f"{_fmt(float(ips['p50']))} ({_fmt(float(ips['p20']))}–{_fmt(float(ips['p80']))})"
        else:
            ips_txt = _status_word(ips["correct"]) if ips else ""
        ms = _fmt(float(m["ms"]["p50"])) if "ms" in m and _num(m["ms"]["p50"]) is not None else ""
        pk = _fmt(float(m["peak_mb"]["p50"])) if "peak_mb" in m else ""
        mb = mx.get("max_batch")
        mb_txt = (
            f"{int(float(mb['p50'])):,}"
            if mb and _num(mb["p50"]) is not None
            else (_status_word(mb["correct"]) if mb else "")
        )
        if mb and "stop:" in mb["correct"]:
            mb_txt += f" ({mb['correct'].split('stop:', 1)[1].strip()})"
        mips = (
            _fmt(float(mx["images_per_s"]["p50"]))
            if "images_per_s" in mx and _num(mx["images_per_s"]["p50"]) is not None
            else ""
        )
        check = ips["correct"] if ips else ""
        lines.append(f"| {prov} | {dtype} | {batch} | {ips_txt} | {ms} | {pk} | {mb_txt} | {mips} | {check} |")
    return lines + [""]


def render_markdown(
    rows: Sequence[Row], *, modes: Sequence[str] = MODE_ORDER, title: str = "Benchmark results", level: int = 2
) -> str:
    """The whole report as markdown (headings start at ``level``)."""
    if not rows:
        return f"{'#' * level} {title}\n\nNo benchmark rows.\n"
    body = header(rows) + train_table(rows) + op_tables(rows, modes) + max_batch_table(rows)
    sub = "#" * (level + 1)
    body = [ln.replace("### ", sub + " ", 1) if ln.startswith("### ") else ln for ln in body]
    return "\n".join([f"{'#' * level} {title}", ""] + body).rstrip() + "\n"


def update_readme(path: Path | str, markdown: str) -> None:
    """Replace the text between the bench markers of ``path`` (ValueError if they are missing or out of order)."""
    path = Path(path)
    text = path.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{path}: markers {START} ... {END} not found (add them where the table should go)")
    path.write_text(text[: i + len(START)] + "\n" + markdown.rstrip() + "\n" + text[j:])


# ---- plots --------------------------------------------------------------------------------------------------------


def plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """PNG per (op, dtype) (ms per case and provider, one panel per mode, log scale, p20–p80 error bars), the
    contrastive scaling in B (time and peak memory) and the training-step throughput. Returns the files written;
    empty if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: PNG plots skipped (the markdown tables are still written)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    ms_rows = [r for r in rows if r["metric"] == "ms" and _num(r["p50"]) is not None and r["op"] != "train_step"]
    for (op, dtype), grp in _group(ms_rows, "op", "dtype").items():
        modes = _order((r["mode"] for r in grp), MODE_ORDER)
        providers = _order((r["provider"] for r in grp), PROVIDER_ORDER)
        cases = list(dict.fromkeys(r["case"] for r in grp))
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        width = 0.8 / max(len(providers), 1)
        for ax, mode in zip(axes[0], modes):
            cell = {(r["case"], r["provider"]): r for r in grp if r["mode"] == mode}
            for k, p in enumerate(providers):
                xs, ys, lo, hi = [], [], [], []
                for i, c in enumerate(cases):
                    r = cell.get((c, p))
                    if r is None:
                        continue
                    y = float(r["p50"])
                    xs.append(i + (k - (len(providers) - 1) / 2) * width)
                    ys.append(y)
                    lo.append(y - float(r["p20"] or y))
                    hi.append(float(r["p80"] or y) - y)
                if xs:
                    ax.bar(xs, ys, width, yerr=[lo, hi], label=p, capsize=2)
            ax.set_xticks(range(len(cases)), cases, rotation=45, ha="right", fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"{op} {mode} ({dtype})", fontsize=9)
            ax.set_ylabel("ms (median, p20–p80)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        files.append(_save(fig, out / f"ops_{op}_{dtype}.png", plt))

    # contrastive: time and memory against B (fwd_bwd), one line per (provider, K)
    cl = [
        r
        for r in rows
        if r["op"] == "contrastive_loss"
        and r["mode"] == "fwd_bwd"
        and _num(r["p50"]) is not None
        and r["metric"] in ("ms", "peak_mb")
        and not r["case"].startswith("max-batch")
    ]
    for (dtype,), grp in _group(cl, "dtype").items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric, label in ((axes[0], "ms", "ms (median)"), (axes[1], "peak_mb", "peak MiB above inputs")):
            lines: dict[tuple[str, int, int], list[tuple[int, float]]] = defaultdict(list)
            for r in grp:
                if r["metric"] == metric:
                    d = json.loads(r["dims_json"])
                    lines[(r["provider"], d.get("K", 1), d.get("D", 0))].append((d["B"], float(r["p50"])))
            for (p, k, dd), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=f"{p} K={k} D={dd}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("B")
            ax.set_ylabel(label)
            if lines:
                ax.legend(fontsize=7)
        fig.suptitle(f"contrastive_loss fwd_bwd vs batch ({dtype})", fontsize=9)
        fig.tight_layout()
        files.append(_save(fig, out / f"contrastive_scaling_{dtype}.png", plt))

    tr = [
        r
        for r in rows
        if r["op"] == "train_step"
        and r["metric"] == "images_per_s"
        and _num(r["p50"]) is not None
        and "max-batch" not in r["case"]
    ]
    if tr:
        tr = sorted(
            tr,
            key=lambda r: (r["dtype"], PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER else 99),
        )
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{r['provider']}\n{r['dtype']}" for r in tr]
        ys = [float(r["p50"]) for r in tr]
        err = [[y - float(r["p20"] or y) for y, r in zip(ys, tr)], [float(r["p80"] or y) - y for y, r in zip(ys, tr)]]
        ax.bar(range(len(tr)), ys, yerr=err, capsize=3)
        ax.set_xticks(range(len(tr)), labels, fontsize=8)
        ax.set_ylabel("images/s (median, p20–p80)")
        ax.set_title(f"training step, {tr[0]['case']} on {tr[0]['gpu']}", fontsize=9)
        fig.tight_layout()
        files.append(_save(fig, out / "train_step.png", plt))
    return files


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", type=Path, help="bench.csv file(s); later files win on equal keys")
    p.add_argument("--out", required=True, type=Path, help="directory for results.md and the PNGs")
    p.add_argument("--readme", type=Path, default=None, help="also replace the marked section of this file")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    missing = [str(c) for c in a.csv if not c.exists()]
    if missing:
        p.error(f"CSV not found: {', '.join(missing)}")
    rows = load(a.csv)
    a.out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(rows)
    (a.out / "results.md").write_text(md)
    print(f"# wrote {a.out / 'results.md'} ({len(rows)} rows)")
    if not a.no_plots:
        for f in plots(rows, a.out):
            print(f"# wrote {f}")
    if a.readme is not None:
        compact = render_markdown(rows, modes=("fwd_bwd", "step"), title="Benchmarks", level=3)
        compact += "\nAll modes, memory tables and plots: `bench/results/` (regenerate with `bench/gpu_run.sh`).\n"
        update_readme(a.readme, compact)
        print(f"# updated the bench section of {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
