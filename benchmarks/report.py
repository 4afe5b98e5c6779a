"""The comparison's outputs: a markdown table, the budget table (best PSNR at each block-work budget,
cachepass against the best peer) and the frontier plot (speedup against PSNR, PSNR against block work)."""

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


#: the block-work budgets of the budget table (issue 15: every budget from 15 % to 50 %)
BUDGETS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def worst_psnr(row: dict) -> float | None:
    """A row's PSNR in its worse generation (the first, warm-up one, or the profiled later one)."""
    values = [v for v in (row.get("psnr"), row.get("psnr_first")) if v is not None]
    return min(values) if values else None


def _usable(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok" and r["tool"] != "full"
            and r.get("block_work") is not None and worst_psnr(r) is not None]


def best_within(rows: list[dict], budget: float, peers: bool) -> dict | None:
    """The row of highest worst-generation PSNR with block work at most ``budget`` (0.5 % slack for the
    attention count): among cachepass's rows, or (``peers``) among the other tools'."""
    chosen = [r for r in _usable(rows) if (r["tool"] != "cachepass") == peers and r["block_work"] <= budget + 0.005]
    return max(chosen, key=worst_psnr, default=None)


def budget_markdown(rows: list[dict]) -> str:
    """Per budget: the best cachepass row and the best peer row within it, and the margin in dB."""
    lines = ["| block work <= | best cachepass | PSNR dB | best peer | PSNR dB | margin dB |", "|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        ours, theirs = best_within(rows, budget, False), best_within(rows, budget, True)
        margin = "-" if ours is None or theirs is None else f"{worst_psnr(ours) - worst_psnr(theirs):+.1f}"
        cells = [f"{100 * budget:.0f}%"]
        for r in (ours, theirs):
            cells += ["-", "-"] if r is None else [f"{r['method']} ({100 * r['block_work']:.0f}%)",
                                                   _num(worst_psnr(r), ".1f")]
        lines.append("| " + " | ".join(cells + [margin]) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Workload `{meta['workload']}`: {meta['description']}; {meta['steps']} steps x 2 CFG calls, "
             f"{meta['device']} {meta['dtype']}, median of {meta['repeats']} after a warm-up; "
             f"torch {meta['torch']}, diffusers {meta['diffusers']}, cache-dit {meta['cache_dit']}. "
             "PSNR dB and rel L1: the generation after the warm-up; 1st-gen PSNR: the warm-up (first) one.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    lines += ["", "Best PSNR within each block-work budget (the worse of the two scored generations):", "",
              budget_markdown(rows)]
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

    fig, axes = plt.subplots(len(panels), 2, figsize=(14, 4.6 * len(panels)), dpi=80, squeeze=False)
    for (ax, ax_work), (rows, title) in zip(axes, panels):
        _draw(ax, rows, title, psnr_cap, plt.get_cmap("tab10").colors)
        _draw_budget(ax_work, rows, title, psnr_cap)
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


def _draw_budget(ax, rows: list[dict], title: str, psnr_cap: float) -> None:
    """PSNR (worse generation) against block work, every row a point, and per tool the best PSNR reached
    within each budget as a step line: where cachepass's line lies above the peers', it wins that budget."""
    usable = _usable(rows)
    for tool, color in (("cachepass", "tab:blue"), ("diffusers", "tab:orange"), ("cache-dit", "tab:green")):
        own = sorted((r["block_work"], min(worst_psnr(r), psnr_cap)) for r in usable if r["tool"] == tool)
        if not own:
            continue
        ax.scatter(*zip(*own), color=color, s=14, alpha=0.5)
        best, line = -math.inf, []
        for work, value in own:
            best = max(best, value)
            line.append((work, best))
        ax.step(*zip(*line), where="post", color=color, lw=1.4, label=f"{tool}: best within the budget")
    ax.set_xlabel("block work (attention calls run / full compute's)")
    ax.set_ylabel(f"PSNR dB, worse generation (>= {psnr_cap:.0f} at {psnr_cap:.0f})")
    ax.set_xlim(0.0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if usable:
        ax.legend(fontsize=7, loc="lower right", frameon=False)
