"""The comparison's outputs: a markdown table and the speedup-vs-PSNR frontier plot."""

from __future__ import annotations

import math

COLUMNS = ["method", "compiler", "s/gen", "speedup", "computed steps", "block work", "PSNR dB", "rel L1",
           "1st-gen PSNR", "extra MiB", "graph breaks", "graphs", "recompiles"]


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def computed_cell(row: dict) -> str:
    """Per branch from the tool's own stats (``25/25``), else block-equivalent steps (``~12.5``)."""
    if row.get("computed") is not None:
        return "/".join(str(c) for c in row["computed"])
    if row.get("block_work") is not None:
        return f"~{row['block_work'] * row['steps']:.1f}"
    return "-"


def table_cells(row: dict) -> list[str]:
    if row.get("status", "ok") != "ok":
        return [row["method"], row.get("compiler", "-"), row["status"]] + [""] * (len(COLUMNS) - 3)
    speedup, work = row["speedup"], row["block_work"]
    return [
        row["method"], row["compiler"], _num(row["seconds"], ".3f"), "-" if speedup is None else f"{speedup:.2f}x",
        computed_cell(row), "-" if work is None else f"{100 * work:.0f}%",
        _num(row["psnr"], ".1f"), _num(row["rel_l1"], ".4f"), _num(row.get("psnr_first"), ".1f"),
        _num(row["extra_mib"], ".2f"),
        _num(row["graph_breaks"], "d"), _num(row["graphs"], "d"), _num(row["recompiles"], "d"),
    ]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Workload `{meta['workload']}`: {meta['description']}; {meta['steps']} steps x 2 CFG calls, "
             f"{meta['device']} {meta['dtype']}, median of {meta['repeats']} after a warm-up; "
             f"torch {meta['torch']}, diffusers {meta['diffusers']}, cache-dit {meta['cache_dit']}. "
             "PSNR dB and rel L1: the generation after the warm-up; 1st-gen PSNR: the warm-up (first) one.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    notes = [f"- {r['method']}: {'; '.join(r['notes'])}" for r in rows if r.get("notes")]
    notes += [f"- {r['method']}: first graph break: {r['graph_break_reasons'][0]}" for r in rows
              if r.get("graph_break_reasons")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (PSNR, speedup) points no other point beats on both, by decreasing PSNR."""
    best, out = -math.inf, []
    for p, s in sorted(points, key=lambda q: (-q[0], -q[1])):
        if s > best:
            out.append((p, s))
            best = s
    return out


STYLES = {"cachepass": ("o", "-"), "diffusers": ("s", "--"), "cache-dit": ("^", ":")}


def plot(rows: list[dict], path: str, title: str, psnr_cap: float = 60.0) -> None:
    """Speedup against PSNR, each method family's frontier as a line over its sweep's points. PSNR above
    ``psnr_cap`` (outputs equal to compute precision) is drawn at the cap."""
    plot_runs([(rows, title)], path, psnr_cap)


def plot_runs(panels: list[tuple[list[dict], str]], path: str, psnr_cap: float = 60.0) -> None:
    """:func:`plot` with one panel per workload, stacked: ``panels`` is (rows, title) per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 4.6 * len(panels)), dpi=80, squeeze=False)
    for ax, (rows, title) in zip(axes[:, 0], panels):
        _draw(ax, rows, title, psnr_cap, plt.get_cmap("tab10").colors)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    try:  # a 64-colour palette keeps the PNG small enough to commit
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        pass


def _draw(ax, rows: list[dict], title: str, psnr_cap: float, colors) -> None:
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r["speedup"] is not None and r["psnr"] is not None
          and r["tool"] != "full"]
    families: dict[str, list[tuple[float, float]]] = {}
    for r in ok:
        families.setdefault(r["family"], []).append((min(r["psnr"], psnr_cap), r["speedup"]))
    count: dict[str, int] = {}
    for name, pts in sorted(families.items()):
        tool = name.split()[0]
        marker, line = STYLES.get(tool, ("x", "-."))
        color = colors[count.setdefault(tool, 0) % len(colors)]
        count[tool] += 1
        ax.scatter(*zip(*pts), color=color, marker=marker, s=16, alpha=0.5)
        ax.plot(*zip(*frontier(pts)), color=color, marker=marker, ms=4, lw=1.3, ls=line, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(psnr_cap, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(f"PSNR vs full compute, dB (>= {psnr_cap:.0f} drawn at {psnr_cap:.0f})")
    ax.set_ylabel("speedup vs full compute, same compiler")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if families:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
