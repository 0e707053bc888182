"""Render a :class:`~patchd.promotion.report.candidate.CandidateReport` as one standalone HTML page.

No template engine: small functions return escaped fragments (``html.escape`` on every value that
comes from data). Images are embedded as data URIs so the file can be mailed or archived alone.
The verdict banner comes first; the page then answers, in order: did the worst group improve, did
the average hold, which cells moved, what failure was patched, with what data and recipe.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from html import escape
from typing import Any

from patchd.promotion.report.candidate import CandidateReport, CellRow, Image

_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700"}
_TITLES = {
    "pass": "PASS: the patch clears the gate",
    "fail": "FAIL: do not promote",
    "inconclusive": "INCONCLUSIVE: not enough evidence (never promoted)",
}

_CSS = """
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
margin:0;color:#1f2328;background:#f6f8fa}main{max-width:1180px;margin:0 auto;padding:0 24px 48px}
.banner{color:#fff;padding:22px 24px;margin:0 0 20px}.banner .inner{max-width:1180px;margin:0 auto}
.banner h1{margin:0 0 4px;font-size:28px;letter-spacing:.2px}.banner .sub{opacity:.92}
.banner ul{margin:10px 0 0;padding-left:20px}.banner .next{margin-top:10px;font-weight:500}
.banner code{background:rgba(255,255,255,.18);
padding:1px 6px;border-radius:4px;color:#fff}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:14px;margin-bottom:20px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 16px}
.card h3{margin:0 0 6px;font-size:13px;text-transform:uppercase;color:#57606a;letter-spacing:.5px}
.big{font-size:26px;font-weight:600}.arrow{color:#8c959f;margin:0 6px}.muted{color:#57606a}
.good{color:#1a7f37}.bad{color:#cf222e}.warn{color:#9a6700}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 18px;
margin-bottom:18px}section h2{margin:0 0 12px;font-size:18px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:6px 8px;
border-bottom:1px solid #eaeef2;vertical-align:middle}th{font-size:12px;color:#57606a;
text-transform:uppercase;letter-spacing:.4px}td.num{font-variant-numeric:tabular-nums}
tr.worst td{background:#fff8c5}.tag{font-size:11px;border-radius:10px;padding:1px 7px;
margin-left:4px;background:#eaeef2;color:#57606a;white-space:nowrap}
.tag.warn{background:#fff8c5;color:#9a6700}
.legend span{display:inline-block;margin-right:14px}.sw{width:10px;height:10px;display:inline-block;
border-radius:2px;margin-right:4px;vertical-align:middle}
.gallery{display:flex;flex-wrap:wrap;gap:14px}.gallery figure{margin:0;max-width:100%;
overflow-x:auto}.gallery img{display:block;border:1px solid #d0d7de;border-radius:6px;
image-rendering:pixelated}.gallery.samples img{height:128px;width:auto;max-width:none}
.gallery.failures img{width:auto;height:auto;max-width:100%;min-height:160px;object-fit:contain}
td.num{white-space:nowrap}td .ci{display:block;font-size:12px}
.gallery figcaption{font-size:13px;color:#57606a}
.kv td:first-child{color:#57606a;width:220px}code{font:13px ui-monospace,SFMono-Regular,monospace}
"""


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _pp(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f} pp"


def _sided(lower: float, upper: float, threshold: float) -> str:
    """Green when confidently above the threshold, red when below, amber when undecided."""
    if lower >= threshold:
        return "good"
    return "bad" if upper < threshold else "warn"


def _delta_tone(value: float | None, tolerance: float) -> str:
    """Green/red only for moves larger than the gate's average tolerance; grey otherwise."""
    if value is None or abs(value) <= tolerance:
        return "muted"
    return "good" if value > 0 else "bad"


def _banner(report: CandidateReport) -> str:
    verdict = report.decision.verdict.value
    reasons = "".join(f"<li>{escape(r)}</li>" for r in report.decision.reasons)
    by = f" by {escape(report.decided_by)}" if report.decided_by else ""
    action = ""
    if report.state == "awaiting_approval":
        cid = escape(report.candidate_id)
        closes = f" &middot; window closes {_when(report.expires_at)}" if report.expires_at else ""
        action = (
            f'<div class="next">Next: <code>patchd approve {cid}</code> or '
            f"<code>patchd reject {cid}</code>{closes}</div>"
        )
    return (
        f'<div class="banner" style="background:{_COLORS[verdict]}"><div class="inner">'
        f"<h1>{escape(_TITLES[verdict])}</h1>"
        f'<div class="sub">Candidate <b>{escape(report.candidate_id)}</b> for model '
        f"<b>{escape(report.model)}</b> &middot; state <b>{escape(report.state)}</b>{by}</div>"
        f"<ul>{reasons}</ul>{action}</div></div>"
    )


def _cards(report: CandidateReport) -> str:
    d = report.decision
    wg_lo, wg_hi = d.worst_group_interval
    avg_lo, avg_hi = d.avg_interval
    n_total = sum(r.n for r in report.rows)
    n_small = min((r.n for r in report.rows), default=0)
    return (
        '<div class="cards">'
        + _card(
            "Worst group",
            d.incumbent_worst[1],
            d.candidate_worst[1],
            f'<span class="{_sided(wg_lo, wg_hi, d.min_improvement)}">'
            f"{_pp(d.worst_group_delta)}</span> "
            f"({d.confidence:.0%} bounds {_pp(wg_lo)} .. {_pp(wg_hi)}; needs &ge; "
            f"{_pp(d.min_improvement)})<br>"
            + _worst_cells(d.incumbent_worst[0], d.candidate_worst[0]),
        )
        + _card(
            "Average accuracy",
            d.incumbent_avg,
            d.candidate_avg,
            f'<span class="{_sided(avg_lo, d.avg_delta, -d.avg_tolerance)}">'
            f"{_pp(d.avg_delta)}</span> "
            f"({d.confidence:.0%} bounds {_pp(avg_lo)} .. {_pp(avg_hi)}; may fall at most "
            f"{d.avg_tolerance * 100:.1f} pp)",
        )
        + '<div class="card"><h3>Held-out evidence</h3>'
        f'<div class="big">{n_total}</div><div class="muted">paired examples in '
        f"{len(report.rows)} cells; smallest cell n={n_small} (n_min={d.n_min})<br>"
        f"{escape(d.method)}, B={d.n_bootstrap}</div></div></div>"
    )


def _worst_cells(before: str, after: str) -> str:
    if before == after:
        return f"worst cell: <b>{escape(before)}</b>"
    return f"worst cell was <b>{escape(before)}</b>, now <b>{escape(after)}</b>"


def _card(title: str, before: float, after: float, detail: str) -> str:
    return (
        f'<div class="card"><h3>{escape(title)}</h3><div class="big">{_pct(before)}'
        f'<span class="arrow">&rarr;</span>{_pct(after)}</div><div class="muted">{detail}</div>'
        "</div>"
    )


def _bar(row: CellRow) -> str:
    """Two interval bars on a 0..100% axis: incumbent grey, candidate blue."""
    width, pad = 220, 6

    def x(v: float) -> float:
        return pad + v * (width - 2 * pad)

    parts = [
        f'<svg width="{width}" height="30" role="img" aria-label="accuracy intervals">',
        f'<line x1="{x(0)}" y1="29" x2="{x(1)}" y2="29" stroke="#d0d7de"/>',
    ]
    for y, acc, (lo, hi), color in (
        (9, row.incumbent, row.incumbent_ci, "#8c959f"),
        (21, row.candidate, row.candidate_ci, "#0969da"),
    ):
        parts.append(
            f'<line x1="{x(lo):.1f}" y1="{y}" x2="{x(hi):.1f}" y2="{y}" '
            f'stroke="{color}" stroke-width="4" stroke-linecap="round" opacity=".45"/>'
        )
        if acc is not None:
            parts.append(f'<circle cx="{x(acc):.1f}" cy="{y}" r="4.5" fill="{color}"/>')
    return "".join(parts) + "</svg>"


def _cell_table(report: CandidateReport) -> str:
    head = (
        "<tr><th>Class</th><th>Group</th><th>n</th><th>Incumbent</th><th>Candidate</th>"
        "<th>Change</th><th>Accuracy with intervals (0&ndash;100%)</th></tr>"
    )
    body = []
    for r in report.rows:
        tags = ('<span class="tag">worst before</span>' if r.incumbent_worst else "") + (
            '<span class="tag">worst after</span>' if r.candidate_worst else ""
        )
        small = (
            f'<span class="tag warn">n &lt; {report.decision.n_min}</span>'
            if r.n < report.decision.n_min
            else ""
        )
        cls = ' class="worst"' if r.incumbent_worst or r.candidate_worst else ""
        body.append(
            f"<tr{cls}><td>{escape(r.cls)}</td><td>{escape(r.group)}{tags}</td>"
            f'<td class="num">{r.n}{small}</td>'
            f'<td class="num">{_pct(r.incumbent)}<span class="muted ci">{_pct(r.incumbent_ci[0])}'
            f" &ndash; {_pct(r.incumbent_ci[1])}</span></td>"
            f'<td class="num">{_pct(r.candidate)}<span class="muted ci">{_pct(r.candidate_ci[0])}'
            f" &ndash; {_pct(r.candidate_ci[1])}</span></td>"
            f'<td class="num {_delta_tone(r.delta, report.decision.avg_tolerance)}">'
            f"{_pp(r.delta)}</td><td>{_bar(r)}</td></tr>"
        )
    legend = (
        '<p class="legend muted"><span><i class="sw" style="background:#8c959f"></i>'
        'incumbent</span><span><i class="sw" style="background:#0969da"></i>candidate</span>'
        f"<span>bands: Wilson {report.decision.confidence:.0%} intervals</span></p>"
    )
    return (
        f"<section><h2>Per group, before and after</h2>{legend}<table>{head}"
        f"{''.join(body)}</table></section>"
    )


def _failure_section(report: CandidateReport) -> str:
    rows = "".join(
        f"<tr><td>{escape(str(m.get('class_name', m.get('cls', ''))))}</td>"
        f"<td>{escape(str(m.get('description', '')))}</td>"
        f'<td class="num">{_num(m.get("strength"))}</td>'
        f'<td class="num">{escape(str(m.get("n_wrong", "")))} / '
        f"{escape(str(m.get('n_total', '')))}</td></tr>"
        for m in report.failure_modes
    )
    table = (
        f"<table><tr><th>Class</th><th>Failure direction</th><th>Strength</th>"
        f"<th>Wrong / total</th></tr>{rows}</table>"
        if rows
        else '<p class="muted">The miner recorded no failure directions for this run.</p>'
    )
    failures = [i for i in report.images if not i.caption.startswith("Synthesized")]
    return (
        f"<section><h2>What failed (mined failure directions)</h2>{table}"
        f"{_gallery(failures, 'failures')}</section>"
    )


def _num(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else escape(str(value or ""))


def _gallery(images: Iterable[Image], kind: str) -> str:
    figs = "".join(
        f'<figure><img src="{i.data_uri()}" alt="{escape(i.caption)}">'
        f"<figcaption>{escape(i.caption)}</figcaption></figure>"
        for i in images
    )
    return f'<div class="gallery {kind}">{figs}</div>' if figs else ""


def _samples_section(report: CandidateReport) -> str:
    if report.regions is not None:  # Defuse: the regions section shows every sample grid
        return _regions_section(report)
    samples = [i for i in report.images if i.caption.startswith("Synthesized")]
    empty = '<p class="muted">No synthesized samples (augmenter "none").</p>'
    body = _gallery(samples, "samples") or empty
    fidelity = _fidelity_table(report)
    return f"<section><h2>Synthesized training samples</h2>{fidelity}{body}</section>"


def _ratio(a: object, b: object) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return f"{a / b:.2f}"
    return "n/a"


def _mse(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def _region_row(r: dict[str, Any], grid: Image | None) -> str:
    label = r.get("label")
    shown = (
        '<span class="warn">unlabelled</span>'
        if label is None
        else f'<span class="bad">{escape(str(label))}</span>'
        if label == "invalid"
        else escape(str(label))
    )
    mix = r.get("prediction_mix") or {}
    preds = ", ".join(
        f"{escape(str(k))} ×{v}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])
    )
    img = (
        f'<img src="{grid.data_uri()}" alt="{escape(grid.caption)}" style="height:64px">'
        if grid
        else ""
    )
    return (
        f"<tr><td>{escape(str(r.get('region')))}</td><td>{img}</td>"
        f'<td class="num">{_num(r.get("weight"))}</td><td>{escape(str(r.get("source_name")))}</td>'
        f"<td>{preds}</td><td>{shown}</td>"
        f'<td class="num">{_ratio(r.get("spread"), r.get("real_spread"))}</td>'
        f'<td class="num">{_num(r.get("novelty"))}</td>'
        f'<td class="num">{_num(r.get("fd"))}</td></tr>'
    )


def _regions_section(report: CandidateReport) -> str:
    """Defuse's failure regions: grids, the model's predictions, labels, spread, novelty,
    realism, and whether a person labelled them."""
    data = report.regions or {}
    grids = {i.caption: i for i in report.region_images}
    n, done = data.get("n_regions", 0), data.get("n_labelled", 0)
    if data.get("labelled_by"):
        rest = "" if done >= n else " The rest are unlabelled."
        who = f"{done} of {n} regions labelled by {escape(str(data['labelled_by']))}.{rest}"
    else:
        who = (
            '<b class="warn">Unlabelled:</b> no one labelled these regions; the correction used '
            "each region's source class, which no person confirmed."
        )
    shown = len(data.get("regions", []))
    if shown < n:
        who += f" The {shown} heaviest of {n} regions are shown."
    vae, real = data.get("vae") or {}, data.get("realism") or {}
    facts = (
        f'<p>{who}</p><p class="muted">VAE reconstruction MSE {_mse(vae.get("recon_mse"))} '
        f"per pixel; realism: Fréchet distance of region samples to real images "
        f"{_num(real.get('regions_fd'))} (two real sets: {_num(real.get('real_fd'))}), in the "
        "incumbent's features. Spread: mean pairwise distance of a region's samples over that of "
        "real images of its source class. Novelty: distance to the nearest misclassified real "
        "image over the real-to-real nearest-neighbour distance (above 1: not near a known "
        "mistake).</p>"
    )
    rows = "".join(
        _region_row(r, grids.get(f"region {r.get('region')}")) for r in data.get("regions", [])
    )
    head = (
        "<tr><th>region</th><th>samples</th><th>weight</th><th>source class</th>"
        "<th>model predicts</th><th>label</th><th>spread / real</th><th>novelty</th>"
        "<th>FD</th></tr>"
    )
    vae_img = [i for i in report.region_images if i.caption.startswith("VAE")]
    return (
        f"<section><h2>Failure regions (Defuse)</h2>{facts}{_gallery(vae_img, 'samples')}"
        f"<table>{head}{rows}</table></section>"
    )


def _fidelity_table(report: CandidateReport) -> str:
    """Per class and direction: was the translation what it claims, and was it used."""
    data = report.fidelity
    if not data:
        return ""
    if not data.get("measured", True):
        reason = escape(str(data.get("reason", "")))
        return f'<p class="muted">Synthesis fidelity not measured: {reason}</p>'
    rows = []
    for d in data.get("directions", []):
        used = d.get("verdict") == "kept"
        tone = "good" if used else "bad"
        rows.append(
            f"<tr><td>{d['cls']}</td><td>{d['source']} &rarr; {d['target']}</td>"
            f"<td>{d['n']}</td><td>{_num(d.get('flip_rate'))}</td><td>{_num(d.get('tttr'))}</td>"
            f"<td>{_num(d.get('class_kept'))} / {_num(d.get('class_kept_ceiling'))}</td>"
            f"<td>{_num(d.get('change_spread'))} / {_num(d.get('real_spread'))}</td>"
            f'<td class="{tone}">{escape(str(d.get("verdict", "")))}</td></tr>'
        )
    head = (
        "<tr><th>class</th><th>group</th><th>n</th><th>flip rate</th>"
        "<th>train-on-translated</th><th>class kept / real cell</th>"
        "<th>change spread / real</th><th>used</th></tr>"
    )
    note = (
        '<p class="muted">Judged on the validation split by classifiers the translator never '
        "saw. A dropped class trains without the consistency term (class-conditional Group DRO)."
        "</p>"
    )
    return f"<h3>Synthesis fidelity</h3><table>{head}{''.join(rows)}</table>{note}"


def _kv(rows: Iterable[tuple[str, str]], empty: str = "") -> str:
    body = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in rows)
    if not body:
        return f'<p class="muted">{escape(empty)}</p>'
    return f'<table class="kv">{body}</table>'


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def _slice_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The production slice's counts: used, where they went, replayed dataset inputs."""
    if "slice_used" not in info:
        return []
    text = (
        f"{info['slice_used']} used: {info.get('slice_to_train', 0)} to train, "
        f"{info.get('slice_to_heldout', 0)} to held-out"
    )
    overlap = info.get("slice_overlap") or {}
    if overlap or info.get("slice_duplicates"):
        parts = ", ".join(f"{n} in {split}" for split, n in sorted(overlap.items()))
        text += f"; already in the dataset: {parts or 'none'}"
        text += f"; repeated inputs: {info.get('slice_duplicates', 0)}"
    return [("production slice", escape(text))]


def _recipe_section(report: CandidateReport) -> str:
    recipe = [
        (k, f"<code>{escape(v if isinstance(v, str) else json.dumps(v, sort_keys=True))}</code>")
        for k, v in sorted(report.recipe.items())
    ]
    total = sum(report.stage_seconds.values())
    disk = report.disk_bytes
    stages = [
        (f"stage {s}", f"{sec:.1f} s" + (f", {_mb(disk[s])}" if s in disk else ""))
        for s, sec in report.stage_seconds.items()
    ]
    if stages:
        on_disk = f", {_mb(sum(disk.values()))} on disk" if disk else ""
        stages.append(("total", f"<b>{total:.1f} s</b>{on_disk}"))
    stages += _slice_rows(report.production_slice)
    made = _when(report.generated_at)
    prov = [
        ("candidate digest (sha256)", f"<code>{escape(report.digest)}</code>"),
        ("parent (incumbent)", f"<code>{escape(report.parent or 'none')}</code>"),
        ("run", f"<code>{escape(report.run_id)}</code>"),
        ("report generated", escape(made)),
    ]
    return (
        '<section><h2>Recipe, stage timings and provenance</h2><div class="cards" '
        'style="grid-template-columns:1fr 1fr;margin:0">'
        f"<div>{_kv(recipe, 'no recipe recorded for this run')}</div>"
        f"<div>{_kv(stages, 'no stage timings recorded')}</div></div>{_kv(prov)}</section>"
    )


def _sections(report: CandidateReport) -> str:
    return (
        f"{_cards(report)}{_cell_table(report)}{_failure_section(report)}"
        f"{_samples_section(report)}{_recipe_section(report)}"
    )


def render_html(report: CandidateReport) -> str:
    """The whole page as a string."""
    title = f"patchd candidate {report.candidate_id}: {report.decision.verdict.value}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"{_banner(report)}<main>{_sections(report)}</main></body></html>"
    )


def render_fragment(report: CandidateReport) -> str:
    """The same evidence as one ``<div>`` (with its ``<style>``) to embed in another page."""
    return f'<style>{_CSS}</style><div class="report">{_banner(report)}{_sections(report)}</div>'
