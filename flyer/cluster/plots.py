"""PNG charts for ``flyer net`` (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from flyer.errors import FieldError


def _pyplot():
    import matplotlib  # on the first chart only: matplotlib is slow to import and only charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    out = Path(path)
    try:
        if out.is_dir():
            raise FieldError("plot", f"{out} is a directory; give a file name such as chart.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise FieldError("plot", f"cannot write {out}: {e.strerror or e}") from None
    except FieldError:
        raise
    except ValueError as e:  # matplotlib: "Format 'txt' is not supported (supported formats: ...)"
        raise FieldError("plot", f"cannot write {out}: {str(e).splitlines()[0]}") from None
    finally:
        _pyplot().close(fig)
    return out


def topology_chart(rows: list[dict], path: str | Path) -> Path:
    """Two panels: cost per endpoint (bars) and endpoints reached (log bars), one bar per topology."""
    plt = _pyplot()
    names = [r["name"].upper() for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = ax1.bar(names, [r["cost_per_endpoint_usd"] / 1e3 for r in rows], color="#4c72b0")
    ax1.bar_label(bars, fmt="%.2fK")
    ax1.set_ylabel("cost per endpoint (thousand USD)")
    ax1.set_title(f"cost per endpoint, radix {rows[0]['switch_radix'] or rows[0]['radix']}")
    bars = ax2.bar(names, [r["endpoints"] for r in rows], color="#dd8452")
    ax2.bar_label(bars, labels=[f"{r['endpoints']:,}" for r in rows], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("endpoints")
    ax2.set_title("endpoints reached")
    return _save(fig, path)


def simulate_chart(rows: list[dict], path: str | Path) -> Path:
    """Grouped bars: achieved all-to-all bandwidth per GPU for each topology and routing."""
    plt = _pyplot()
    topos = list(dict.fromkeys(r["topology"] for r in rows))
    routings = list(dict.fromkeys(r["routing"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(routings)
    for j, routing in enumerate(routings):
        xs = [i + j * width for i in range(len(topos))]
        ys = [next((r["bandwidth_per_gpu_gb_s"] for r in rows if r["topology"] == t and r["routing"] == routing), 0)
              for t in topos]
        ax.bar(xs, ys, width, label=routing)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(topos))], [t.upper() for t in topos])
    ax.set_ylabel("all-to-all bandwidth per GPU (GB/s)")
    ax.legend()
    return _save(fig, path)
