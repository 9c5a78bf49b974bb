"""Write a benchmark's results: rows.jsonl (one JSON row per configuration), table.md and plot.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

def _fmt(value, digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}{suffix}"
    return f"{value}{suffix}"


def _psnr(parity: dict, key: str) -> str:
    if parity.get(f"max_abs_vs_{key}") == 0.0:
        return "identical"
    return _fmt(parity.get(f"psnr_vs_{key}_db"), 1)


def markdown_table(rows: list[dict], header: dict) -> str:
    """The table a reader compares runtimes by: ratios first, parity beside every timing."""
    m = header["machine"]
    peaks = rows[0].get("matmul_peaks") or {} if rows else {}
    s = rows[0]["settings"] if rows else {}
    lines = [
        f"# Pipeline benchmark: {s.get('model')} at {s.get('width')}x{s.get('height')}, {s.get('steps')} steps, "
        f"guidance {s.get('guidance_scale')}",
        "",
        f"Commit `{header['commit']}`; {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
        f"flags {' '.join(m['cpu_flags'])}); torch {m['versions'].get('torch')}, "
        f"diffusers {m['versions'].get('diffusers')}; {header['timestamp']}.",
        f"Warm-up {s.get('warmup')}, median of {s.get('runs')} alternated runs (configurations applied around each run: "
        f"after an untimed short call). Matmul 2048² peak on this machine: "
        f"fp32 {peaks.get('fp32_gflops')} GFLOP/s, bf16 {peaks.get('bf16_gflops')} GFLOP/s. "
        "Ratios are against diffusers eager fp32 (higher is faster); parity is of the final image.",
        "",
        "| config | status | end-to-end s | speed-up | UNet step s | UNet speed-up | GFLOP/s (fp32 / bf16 peak) "
        "| compile cold / warm s | load s | peak RSS MiB | max-abs vs ours eager | PSNR vs ours eager | PSNR vs diffusers eager "
        "| adherence |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f, p = r["figures"], r["parity"]
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['status']}: {r['reason']} |" + " – |" * 12)
            continue
        rate = "–"
        if f.get("achieved_gflops") is not None:
            rate = (f"{f['achieved_gflops']:.3g} ({100 * f['fraction_of_fp32_peak']:.0f}% / "
                    f"{100 * f['fraction_of_bf16_peak']:.0f}%)")
        compile_s = "–" if f.get("compile_cold_s") is None else f"{_fmt(f['compile_cold_s'], 1)} / {_fmt(f.get('compile_warm_s'), 1)}"
        if f.get("export_s") is not None:  # a peer that converts the checkpoint first (OpenVINO)
            compile_s = f"{_fmt(f['export_s'] + f['ov_compile_s'], 1)} (export {_fmt(f['export_s'], 1)} + compile)"
        lines.append(
            f"| {r['config']} | ok | {_fmt(f.get('end_to_end_s'), 3)} | {_fmt(f.get('speedup_vs_diffusers_eager'), 2, '×')} "
            f"| {_fmt(f.get('unet_step_s'), 4)} | {_fmt(f.get('unet_speedup_vs_diffusers_eager'), 2, '×')} | {rate} "
            f"| {compile_s} | {_fmt(f.get('load_s'), 2)} | {_fmt(f.get('peak_rss_mib'), 0)} | {_fmt(p.get('max_abs_vs_ours_eager'), 4)} "
            f"| {_psnr(p, 'ours_eager')} | {_psnr(p, 'diffusers_eager')} | {_fmt(p.get('adherence'), 2)} |")
    lines += ["", "Load s: from_pretrained of the whole pipeline plus the configuration's set-up, in a fresh "
              "process after its imports (import_s in the rows); peak RSS and compile cold / warm come "
              "from fresh processes too.", "GFLOP/s is the eager UNet step's FLOP count over the step time: for configurations that skip "
              "work (DeepCache, ToMe, TGATE) it is an effective rate, not what the hardware did.", ""]
    return "\n".join(lines)


def _points(rows: list[dict]) -> list[tuple[str, float, float | None]]:
    """(label, speed-up, PSNR vs diffusers eager or None when identical) for each row that ran."""
    pts = []
    for r in rows:
        x = r["figures"].get("speedup_vs_diffusers_eager")
        if r["status"] != "ok" or x is None:
            continue
        identical = r["parity"].get("max_abs_vs_diffusers_eager") == 0.0
        y = r["parity"].get("psnr_vs_diffusers_eager_db")
        if y is None and not identical:
            continue
        pts.append((r["config"], float(x), None if identical else float(y)))
    return pts


def _plot_pillow(pts, path: Path, title: str) -> None:
    """Speed-up against PSNR with Pillow only: no plotting dependency, one tested code path."""
    from PIL import Image, ImageDraw

    w, h, left, right, top_m, bottom = 1000, 600, 70, 170, 50, 60  # right margin: room for labels
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    finite = [y for _, _, y in pts if y is not None]
    ytop = (max(finite) + 10) if finite else 100.0
    ybot = min(finite + [ytop - 20]) - 5
    xs = [x for _, x, _ in pts] + [1.0]
    xlo, xhi = min(xs) * 0.9, max(xs) * 1.1 + 1e-9

    def px(x, y):
        return (left + (x - xlo) / (xhi - xlo) * (w - left - right),
                h - bottom - (y - ybot) / (ytop - ybot) * (h - top_m - bottom))

    d.rectangle([left, top_m, w - right, h - bottom], outline="black")
    d.text((w // 2 - 200, 15), title, fill="black")
    d.text((w // 2 - 150, h - 30), "speed-up vs diffusers eager fp32 (end to end)", fill="black")
    d.text((5, top_m - 30), "PSNR vs diffusers eager (dB)", fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = xlo + frac * (xhi - xlo)
        y = ybot + frac * (ytop - ybot)
        d.text((px(x, ybot)[0] - 10, h - bottom + 5), f"{x:.2f}", fill="black")
        d.text((10, px(xlo, y)[1] - 6), "same" if frac == 1.0 else f"{y:.0f}", fill="black")
    x1 = px(1.0, ybot)[0]
    d.line([x1, top_m, x1, h - bottom], fill="grey")
    d.text((w - right - 190, px(xlo, ytop)[1] - 14), "top edge: identical images", fill="grey")
    placed: list[tuple[float, float, float, float]] = []
    for label, x, y in sorted(pts, key=lambda p: p[1]):
        cx, cy = px(x, ytop if y is None else y)
        colour = (31, 119, 180) if label.startswith("ours") else (255, 127, 14)
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        box = d.textbbox((cx + 6, cy - 6), label)
        while any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            box = (box[0], box[1] + 12, box[2], box[3] + 12)  # stack overlapping labels downwards
        placed.append(box)
        if box[1] > cy - 6:  # moved: a leader line back to its point
            d.line([cx, cy, box[0], box[1] + 5], fill="lightgrey")
        d.text((box[0], box[1]), label, fill="black")
    img.save(path)


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up (x) against PSNR (y), one labelled point per configuration."""
    _plot_pillow(_points(rows), path, title)


def write_results(rows: list[dict], header: dict, out: Path) -> dict[str, Path]:
    """rows.jsonl (header fields in every row), table.md, plot.png under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rows": out / "rows.jsonl", "table": out / "table.md", "plot": out / "plot.png"}
    with open(paths["rows"], "w") as fh:
        for row in rows:
            fh.write(json.dumps(_json_safe({**header, **row}), allow_nan=False, default=str) + "\n")
    paths["table"].write_text(markdown_table(rows, header))
    s = rows[0]["settings"] if rows else {}
    write_plot(rows, paths["plot"], f"{s.get('model')} {s.get('width')}x{s.get('height')}, {s.get('steps')} steps")
    return paths


def _json_safe(value):
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
