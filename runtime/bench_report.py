"""The bench report: report.json (everything), report.md (what a team reads) and three PNG plots."""

from __future__ import annotations

import copy
from pathlib import Path

from lrdeploy.io import atomic_write_bytes, atomic_write_json, cache_root
from lrdeploy.runtime.bench import BASELINE_FORMS

MIB = 1 << 20
PLOTS = {"throughput": "throughput-vs-ctx.png", "memory": "memory-vs-ctx.png", "quality": "ppl-vs-bytes.png"}


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / MIB:,.0f}"


def markdown(report: dict, command: str) -> str:
    m = report["machine"]
    models = report["models"]
    budget = report["memory_budget"]
    lines = [
        "# lrdeploy bench",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores{', ' + m['gpu'] if m.get('gpu') else ''}; "
        f"device {report['device']}; load average {m.get('load_average') or 0:.1f} at the end; torch "
        f"{m.get('torch', '-')}, onnxruntime {m.get('onnxruntime', '-')}, llama-cpp-python {m.get('llama_cpp', '-')}.",
        f"Each number is the median of {report['runs']} runs; every run is a fresh process that loads the model, "
        "warms up, then prefills ctx tokens (512-token chunks) and decodes "
        f"{report['gen_tokens']} greedy tokens. Models alternate within each round (A B A B). Ratios (×) are against "
        "the uncompressed model on the same backend. Memory is what the model adds to the process: resident memory "
        "(RSS; CUDA peak on GPU) less that of the interpreter with every runtime library already imported, so "
        "Python's own footprint does not dilute the comparison. The memory budget applies to the same quantity."
        + (" This llama.cpp build has AMX kernels, so every llama.cpp model (the baseline too) loaded its weights into "
           "plain CPU buffers, without repacking, to avoid ggml's AMX crash (README, Troubleshooting)."
           if m.get("llama_cpp_amx") and any(r["backend"] == "llamacpp" for r in models) else ""),
        "",
        "## Size, memory and context",
        "",
        "| model | backend | file MiB | bpw | load s | memory after load MiB | KV bytes/token |"
        + (f" max ctx in {budget / MIB:,.0f} MiB |" if budget else "")
        + (" perplexity |" if report["ppl"] else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if budget else "") + ("---:|" if report["ppl"] else ""),
    ]
    for r in models:
        v = r["vs_baseline"]
        bpw = "" if r.get("bpw") is None else f"{r['bpw']:.3f}"
        row = (f"| {r['label']} | {r['backend']} | {_mib(r['bytes'])} ({_x(v['bytes'])}) | {bpw} | {r['load_s']:.2f} "
               f"| {_mib(r['rss_after_load'])} ({_x(v['rss_after_load'])}) | {r['kv_per_token']:,} |")
        if budget:
            mc = r["max_ctx"]
            note = " (model limit)" if mc["limited_by"] == "model" else ""
            check = "" if mc["checked"] else " (none fits)"
            ratio = f" ({_x(v['max_ctx'])})" if v["max_ctx"] is not None else ""
            row += f" {mc['tokens']:,}{note}{check}{ratio} |"
        if report["ppl"]:
            row += f" {r['ppl']:.2f} |"
        lines.append(row)
    lines += [
        "",
        "## Throughput and peak memory by context",
        "",
        "| model | ctx | prefill tok/s | decode tok/s | peak MiB | KV MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in models:
        v = r["vs_baseline"]
        for i, row in enumerate(r["ctx"]):
            lines.append(
                f"| {r['label']} | {row['ctx']:,} | {row['prefill_tps']:,.0f} ({_x(v['prefill_tps'][i])}) "
                f"| {row['decode_tps']:,.1f} ({_x(v['decode_tps'][i])}) | {_mib(row['peak'])} ({_x(v['peak'][i])}) "
                f"| {row['kv_bytes'] / MIB:,.1f} |"
            )
    if budget:
        lines += ["", "## How the maximum context was found", ""]
        for r in models:
            mc = r["max_ctx"]
            checks = "; ".join(
                f"{c['tokens']:,} tokens → " + (f"peak {_mib(c['peak'])} MiB" if "peak" in c else c["error"])
                for c in mc["checks"]
            ) or "no run possible"
            found = f"the longest that fits: {mc['tokens']:,} tokens" if mc["tokens"] else "none fits"
            if mc["tokens"] and not mc.get("checked"):
                found += " (a timed run of that length stayed in the budget)"
            lines.append(
                f"- {r['label']}: first guess from the timed runs' peaks and {r['kv_per_token']:,} KV bytes per token;"
                f" real runs: {checks}; {found}."
            )
    if report["ppl"]:
        p = report["ppl"]
        lines += ["", f"Perplexity: `{p['text']}` (part {p.get('range') or 'all'}), {p['windows']} non-overlapping "
                  f"windows of {p['ctx']} tokens, every predicted token scored."]
    lines += ["", *(f"![{k}]({v})" for k, v in PLOTS.items() if k != "quality" or report["ppl"]), ""]
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        tmp = path.with_name(path.name + ".tmp.png")
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in models:
        ctx = [row["ctx"] for row in r["ctx"]]
        style = "--" if r["role"] == "baseline" else "-"
        axes[0].plot(ctx, [row["prefill_tps"] for row in r["ctx"]], style, marker="o", label=r["label"])
        axes[1].plot(ctx, [row["decode_tps"] for row in r["ctx"]], style, marker="o", label=r["label"])
    for ax, what in zip(axes, ("prefill", "decode"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"{what} tokens/s")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    save(fig, PLOTS["throughput"])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in models:
        ctx = [row["ctx"] for row in r["ctx"]]
        style = "--" if r["role"] == "baseline" else "-"
        ax.plot(ctx, [row["peak"] / MIB for row in r["ctx"]], style, marker="o", label=r["label"])
    if report["memory_budget"]:
        ax.axhline(report["memory_budget"] / MIB, color="red", lw=1, label="memory budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("peak memory (MiB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, PLOTS["memory"])

    if report["ppl"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in models:
            ax.scatter(r["bytes"] / MIB, r["ppl"], marker="s" if r["role"] == "baseline" else "o")
            ax.annotate(r["label"], (r["bytes"] / MIB, r["ppl"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("perplexity")
        ax.grid(True, alpha=0.3)
        save(fig, PLOTS["quality"])
    return written


def report_path(path: str) -> str:
    """PATH as a report records it: relative to the working directory when under it, '<cache>/…' under the lrdeploy
    cache, '~/…' under the home directory, else as it is. A report is read on other machines, where this one's
    absolute paths mean nothing."""
    p = Path(path)
    if not p.is_absolute():
        return path
    for base, prefix in ((Path.cwd(), ""), (cache_root(), "<cache>/"), (Path.home(), "~/")):
        for a, b in ((p, base), (p.resolve(), base.resolve())):  # as given, then with links resolved
            if a == b:
                return prefix.rstrip("/") or "."
            if b in a.parents:
                return prefix + a.relative_to(b).as_posix()
    return path


def portable(report: dict, command: str) -> tuple[dict, str]:
    """REPORT and COMMAND with every path as report_path records it; a baseline that bench exported into its cache
    is named by its source and form instead, e.g. 'smollm2 (F16 GGUF, cached)'."""
    report = copy.deepcopy(report)
    source = report.get("baseline")
    for m in report["models"]:
        exported = m["role"] == "baseline" and source is not None and m["path"] != source
        if exported and m["backend"] in BASELINE_FORMS:
            m["path"] = f"{report_path(source)} ({BASELINE_FORMS[m['backend']]}, cached)"
        else:
            m["path"] = report_path(m["path"])
        m["files"] = [report_path(f) for f in m.get("files", [])]
    if source is not None:
        report["baseline"] = report_path(source)
    if report.get("ppl") and report["ppl"].get("text"):
        report["ppl"]["text"] = report_path(report["ppl"]["text"])
    command = " ".join(report_path(w) for w in command.split(" "))
    return report, command


def write_report(report: dict, out: Path, command: str) -> list[Path]:
    """report.json, report.md and the plots in OUT, each written under a temporary name first; paths as
    `portable` records them."""
    report, command = portable(report, command)
    out.mkdir(parents=True, exist_ok=True)
    files = plots(report, out)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", markdown(report, command).encode())
    return [*files, out / "report.json", out / "report.md"]

