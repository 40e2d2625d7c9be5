"""Run folder output: results.json, report.md and report.html with the plots embedded (:mod:`guardrail.pages`).

Every number is printed with the number of prompts (or variants) behind it, and the
headline numbers are set against the paper's in a "paper vs this run" table with a
verdict per finding from :mod:`guardrail.eval.verdicts` (one vocabulary, one rule per
verdict) and the strict BFCL metrics beside the lenient ones. ``results.json`` is strict
JSON: a NaN or infinity anywhere is an error, not a silent ``NaN`` token.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from guardrail.eval.verdicts import (
    Judgement, Verdict, by_construction, directional, feature_count, interval_direction, new_measurement, null_correlation,
    separation, stays_zero, pooled_sign, template_detectors,
)
from guardrail.pages import render_page

# --------------------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pp"


def ci_pp(ci: list | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def num(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def pval(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def delta_cell(d: dict[str, Any] | None) -> str:
    """``+12.5 pp [lo, hi] newcombe, p = 0.01 (n=40)`` for a paired delta of a rate.

    A delta whose interval does not exist says why instead of printing a zero-width one.
    """
    if not d:
        return "–"
    if d.get("ci") is None and "t_ci" in d:  # results written before Newcombe intervals
        return f"{pp(d['delta'])} t-CI {ci_pp(d.get('t_ci'))} boot {ci_pp(d.get('bootstrap_ci'))} (n={d['n']})"
    interval = ci_pp(d.get("ci")) or f"no interval ({d.get('undefined') or 'undefined'})"
    test = f", {'McNemar' if d.get('method') == 'newcombe' else 't'} p = {pval(d.get('p'))}" if d.get("p") is not None else ""
    return f"{pp(d['delta'])} {interval} {d.get('method', '')}{test} (n={d['n']})".replace("  ", " ")


def strict_cell(deltas: dict[str, Any] | None) -> str:
    """Strict BFCL metrics of the same comparison (exact name, exact arguments), beside the lenient one."""
    if not deltas:
        return "–"
    parts = [f"{label} {pp(deltas[k]['delta'])} {ci_pp(deltas[k].get('ci'))}".strip()
             for k, label in (("name_correct", "name"), ("args_correct", "args")) if deltas.get(k)]
    return "; ".join(parts) or "–"


# --------------------------------------------------------------------------- paper vs run

PAPER_STEER_LOW = 0.48  # lower end of the paper's +65 pp [48, 82] single-feature steering gain


@dataclass(frozen=True)
class Finding:
    """One row of the "paper vs this run" table: what was claimed, what was measured, the verdict and its rule."""

    finding: str
    paper: str
    run: str
    strict: str
    verdict: Verdict
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"finding": self.finding, "paper": self.paper, "run": self.run, "strict": self.strict,
                "verdict": self.verdict.value, "why": self.why}


def _add(rows: list[Finding], finding: str, paper: str, run: str, judged: Judgement, strict: str = "") -> None:
    rows.append(Finding(finding, paper, run, strict, judged.verdict, judged.why))


def _rate_run(d: dict[str, Any] | None) -> str:
    return f"{pct(d['pre'])} → {pct(d['post'])}, {delta_cell(d)}" if d else "–"


def _splice_findings(res: dict[str, Any]) -> list[Finding]:
    """Rows for the splice: A's gain, spillover into B, and the artifact-only threat."""
    rows: list[Finding] = []
    sp = res.get("splice", {})
    A, A1 = sp.get("A_recon_joint_delta", {}), sp.get("A_recon_single_delta", {})
    B, B1 = sp.get("B_recon_joint_delta", {}), sp.get("B_recon_single_delta", {})
    _add(rows, "Splice raises A's tool correctness (joint encoding)", "19% → 50%, +31.1 ± 9.7 pp (n=100 per run, 47 runs)",
         _rate_run(A.get("tool_correctness")), directional(A.get("tool_correctness")), strict_cell(A))
    _add(rows, "Splice of A from A alone (single-model encoding)", "not measured", _rate_run(A1.get("tool_correctness")),
         new_measurement(A1.get("tool_correctness")), strict_cell(A1))
    _add(rows, "Spillover: B's tool selection rises under splice (joint)", "+6.8 ± 5.0 pp", _rate_run(B.get("tool_correctness")),
         directional(B.get("tool_correctness")), strict_cell(B))
    _add(rows, "Format accuracy never spills into B", "0 pp in 47/47 runs", _rate_run(B.get("format_accuracy")), stays_zero(B.get("format_accuracy")))
    _add(rows, "Artifact-only threat: B + crosscoder, no A (single-model encoding)", "not measured (confounded in the paper)",
         _rate_run(B1.get("tool_correctness")), new_measurement(B1.get("tool_correctness")), strict_cell(B1))
    return rows


def _steering_findings(res: dict[str, Any]) -> list[Finding]:
    """Rows for single-feature steering, the standard crosscoder's feature count, controls."""
    rows: list[Finding] = []
    st = res.get("steering", {}).get("summary", {})
    n_st = res.get("steering", {}).get("n_prompts")
    one = st.get("a_exclusive_single_feature_best")
    _add(rows, "Steering one A-exclusive feature raises A's tool correctness", "+65 pp [48, 82] (n=40, best of grid)",
         f"{delta_cell(one)} at α={one['alpha']:g}, feature {one['features']} (best of {len(res.get('steering', {}).get('alphas', []))} α)" if one else "–",
         directional(one, paper_low=PAPER_STEER_LOW), strict_cell((one or {}).get("strict")))
    need, sb = st.get("standard_features_to_match_single_a_exclusive"), st.get("standard_best")
    _add(rows, "The standard crosscoder needs many features for the same gain", "33 features for +70 pp",
         (f"{need} features match the single A-exclusive gain" if need is not None else "no |S| matched it")
         + (f"; best {pp(sb['delta'])} with {sb['n_features']} features at α={sb['alpha']:g} (n={n_st})" if sb else ""),
         feature_count(need, one, sb))
    bc = st.get("b_exclusive_control")
    _add(rows, "B-exclusive control changes nothing in A", "exactly 0",
         f"max ‖δ‖ = {num(bc['max_delta_norm'])}, rows changed {bc['rows_changed']}, max |Δ| {pp(bc['max_abs_gain'])} over {bc['n_cells']} cells" if bc else "–",
         by_construction(bc["exactly_zero"] if bc else None, what="B-exclusive features have no decoder row in A"))
    itf = st.get("interference")
    test = (itf or {}).get("test") or ({"undefined": "no test of the sign over prompts"} if itf else None)
    _add(rows, "A-exclusive ∪ shared interferes (worse than A-exclusive alone)", "worse",
         (f"mean Δ(union) − Δ(A-excl) = {pp(itf['mean_union_minus_a_exclusive'])}; worse in {itf['cells_worse']}/{itf['n_cells']} cells, "
          f"better in {itf['cells_better']}; permutation over prompts p = {pval((test or {}).get('p'))}") if itf else "–",
         pooled_sign(test, positive=False))
    return rows


def _ablation_findings(res: dict[str, Any]) -> list[Finding]:
    """Rows for the exclusive-penalty ablation."""
    rows: list[Finding] = []
    ab = res.get("ablation")
    claim, paper = "Penalising exclusive features lowers A's splice gain", "+34.8 → +25.8 pp (5% share)"
    if not ab:
        _add(rows, claim, paper, "–", directional(None))
        return rows
    fr, pe, diff = ab["free"]["A_gain"]["tool_correctness"], ab["penalised"]["A_gain"]["tool_correctness"], ab["penalised_minus_free"]["tool_correctness"]
    _add(rows, claim, paper, f"{pp(fr['delta'])} (free) → {pp(pe['delta'])} (λ_excl={ab['settings']['lambda_excl'][1]:g}); difference {delta_cell(diff)}",
         directional(diff, positive=False), strict_cell(ab["penalised_minus_free"]))
    return rows


def _sweep_findings(res: dict[str, Any]) -> list[Finding]:
    """Rows for the statistics across the sweep's variants (tests over the prompts they share)."""
    rows: list[Finding] = []
    sw = res.get("sweep", {}).get("statistics")
    if not sw:
        _add(rows, "Splice gain is positive across the sweep", "45/47 positive, p ≈ 8e-12", "–", pooled_sign(None, positive=True))
        return rows
    s, permA = sw["dA_tool_sign_test"], sw.get("dA_tool_permutation")
    _add(rows, "Splice gain is positive across the sweep", "45/47 positive, p ≈ 8e-12 (sign test over runs)",
         f"{s['n_pos']}/{s['n']} positive ({s['n_ties']} ties; no sign-test p: variants share prompts); "
         f"permutation over prompts p = {pval((permA or {}).get('p'))}", pooled_sign(permA or {"undefined": "no per-prompt outcomes"}, positive=True))
    permB = sw.get("dB_tool_permutation")
    _add(rows, "Δ_B > 0 across runs", "mean +6.7 pp, t = 9.6, p < 1e-12 (one-sample t over runs)",
         f"mean {pp(sw.get('dB_tool_mean'))} over {sw['n_variants']} variants; permutation over prompts p = {pval((permB or {}).get('p'))}",
         pooled_sign(permB or {"undefined": "no per-prompt outcomes"}, positive=True))
    w = sw["dB_standard_vs_dfc"]
    _add(rows, "Standard CC spills more into B than the DFC", "+8.9 vs +5.9 pp, t = 1.63, p = 0.12 (Welch over runs)",
         f"{pp(w.get('mean_standard'))} vs {pp(w.get('mean_dfc'))} (n={w['n']}); prompt-bootstrap interval of the difference "
         f"{ci_pp((w.get('bootstrap') or {}).get('ci')) or '–'}", interval_direction(w.get("bootstrap"), positive=True))
    r = sw["pearson_mse_vs_dA"]
    boot = r.get("bootstrap") or {}
    _add(rows, "Reconstruction MSE does not predict the splice gain", "r = +0.08 [−0.21, +0.36] (n=47)",
         f"r = {num(r['r'], '{:+.2f}')} (n={r['n']}); prompt-bootstrap interval [{num((boot.get('ci') or [None])[0], '{:+.2f}')}, "
         f"{num((boot.get('ci') or [None, None])[1], '{:+.2f}')}]", null_correlation(r.get("bootstrap") or ({"undefined": r.get("undefined")} if r.get("undefined") else None)))
    return rows


def _explain_findings(res: dict[str, Any]) -> list[Finding]:
    """Rows for what the top features fire on, and the decoder geometry."""
    rows: list[Finding] = []
    ex = res.get("explain")
    if ex and ex.get("features"):
        a_feats = [f for f in ex["features"] if f["partition"] == "a_exclusive" and f["template_share"] is not None]
        share = sum(f["template_share"] for f in a_feats) / len(a_feats) if a_feats else ex.get("mean_template_share")
        base = ex.get("template_token_fraction") or 0
        ending = ex.get("prompt_end_markers")
        _add(rows, "Top features are structural-template detectors", "fire on `</tool_call> <response>`",
             f"{pct(share)} of top activations on template tokens (base rate {pct(base)}; {len(a_feats) or len(ex['features'])} features, {ex['n_prompts']} prompts"
             + (f"; not counting {', '.join(ending)}, which ends every tool prompt)" if ending else ")"),
             template_detectors(share, base, prompt_end_markers=ending))
    geo = res.get("geometry")
    if geo:
        rd, rc = geo["dfc"]["recovery"], geo.get("control", {}).get("recovery", {})
        _add(rows, "Decoder geometry separates partitions beyond a random-partition control", "partitions visually separable, not disjoint",
             f"ARI {num(rd.get('ari'), '{:.2f}')} (DFC) vs {num(rc.get('ari'), '{:.2f}')} (standard CC, random matched partition); {geo['n_features']} features",
             separation(rd.get("ari"), rc.get("ari")))
    return rows


def paper_vs_run(res: dict[str, Any]) -> list[Finding]:
    """One row per headline finding of the paper, filled from whatever this run measured."""
    sections = (_splice_findings, _steering_findings, _ablation_findings, _sweep_findings, _explain_findings)
    return [row for section in sections for row in section(res)]


# --------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def saturation_figure(steering: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [(f, v) for f, v in steering["families"].items() if v.get("cells")]
    if not fams:
        return None
    cols = min(3, len(fams))  # at most three panels a row: five side by side shrink below legible on a page
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(fams):]:
        ax.set_visible(False)
    for ax, (fam, data) in zip(axes.flat, fams):
        sizes = [str(s) for s in data["sizes"]]
        for alpha in steering["alphas"]:
            cells = [c for c in data["cells"] if c["alpha"] == alpha]
            y = [100 * c["delta"]["tool_correctness"]["delta"] for c in cells]
            cis = [c["delta"]["tool_correctness"].get("ci") or [None, None] for c in cells]
            lo = [100 * (ci[0] if ci[0] is not None else d / 100) for ci, d in zip(cis, y)]
            hi = [100 * (ci[1] if ci[1] is not None else d / 100) for ci, d in zip(cis, y)]
            x = list(range(len(cells)))
            ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], marker="o", ms=3, capsize=2, label=f"α={alpha:g}")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"{fam} ({data['n_candidates']} candidates)", fontsize=9)
        ax.set_xlabel("|S|")
    for row in axes:
        row[0].set_ylabel(f"Δ tool correctness of A (pp), n={steering['n_prompts']}", fontsize=8)
    axes.flat[len(fams) - 1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def splice_figure(splice: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [("A", "clean"), ("A", "recon_joint"), ("A", "recon_single"), ("B", "clean"), ("B", "recon_joint"), ("B", "recon_single")]
    conds = [c for c in conds if f"{c[0]}_{c[1]}" in splice]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for j, metric in enumerate(("tool_correctness", "format_accuracy", "name_correct")):
        vals = [100 * splice[f"{m}_{c}"][metric] for m, c in conds]
        ax.bar([i + 0.27 * (j - 1) for i in range(len(conds))], vals, width=0.27, label=metric)
    ax.set_xticks(range(len(conds)), [f"{m} {c}" for m, c in conds], fontsize=8)
    ax.set_ylabel(f"% of {splice['n_prompts']} tool prompts")
    ax.legend(fontsize=7)
    ax.set_title("splice: clean vs reconstructed last prompt token", fontsize=9)
    fig.tight_layout()
    return fig


def sweep_figure(sweep: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["variants"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for k, (kind, colour) in enumerate((("standard", "tab:orange"), ("dfc", "tab:blue"))):
        sel = [r for r in rows if r["kind"] == kind]
        for m, off in (("A", -0.15), ("B", 0.15)):
            y = [100 * r[f"d{m}_tool_correctness"] for r in sel]
            axes[0].scatter([k + off] * len(y), y, c=colour, marker="o" if m == "A" else "^", s=18, label=f"{kind} Δ{m}" if y else None)
    axes[0].set_xticks([0, 1], ["standard", "DFC"])
    axes[0].axhline(0, color="gray", lw=0.5)
    axes[0].set_ylabel(f"Δ tool correctness (pp), n={sweep['n_prompts']} prompts each")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"sweep: {sweep['n_variants']} variants", fontsize=9)
    with_mse = [r for r in rows if r.get("mse") is not None]
    axes[1].scatter([r["mse"] for r in with_mse], [100 * r["dA_tool_correctness"] for r in with_mse], s=18)
    pr = sweep["statistics"]["pearson_mse_vs_dA"]
    axes[1].set_title(f"MSE vs Δ_A: r={num(pr['r'], '{:+.2f}')} (n={pr['n']})", fontsize=9)
    axes[1].set_xlabel("reconstruction MSE (normalised)")
    axes[1].set_ylabel("Δ_A tool correctness (pp)")
    fig.tight_layout()
    return fig


def make_figures(res: dict[str, Any]) -> dict[str, bytes]:
    from guardrail.eval.experiments.geometry import geometry_figure

    makers: list[tuple[str, str, Callable]] = [
        ("splice", "splice.png", splice_figure), ("steering", "saturation.png", saturation_figure),
        ("sweep", "sweep.png", sweep_figure), ("geometry", "geometry.png", geometry_figure),
    ]
    out: dict[str, bytes] = {}
    for key, fname, fn in makers:
        if res.get(key) and "error" not in res[key]:
            try:
                fig = fn(res[key])
            except Exception as exc:  # noqa: BLE001 - a broken plot must not lose the run's numbers
                res.setdefault("meta", {}).setdefault("notes", []).append(f"plot {fname} failed: {type(exc).__name__}: {exc}")
                continue
            if fig is not None:
                out[fname] = _png(fig)
    return out


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]  # a header cell may hold a pipe too: |S|
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _health_rows(name: str, h: dict[str, Any]) -> list[list[str]]:
    rows = []
    tr = (h.get("training") or {}).get("partitions") or {}
    ev = (h.get("eval") or {}).get("partitions") or {}
    for part in ("a_exclusive", "b_exclusive", "shared"):
        if part not in tr and part not in ev:
            continue
        t, e = tr.get(part, {}), ev.get(part, {})
        rows.append([name, part, str(h["partition"].get(part, "")), num(t.get("dead_fraction"), "{:.3f}"), num(t.get("mean_fire_rate"), "{:.4f}"),
                     num(e.get("dead_fraction_all"), "{:.3f}"), num(e.get("fire_rate_tool"), "{:.4f}"), num(e.get("fire_rate_plain"), "{:.4f}")])
    return rows


def dictionaries_section(res: dict[str, Any]) -> str:
    rows = []
    for name, h in (res.get("dictionaries") or {}).items():
        rows += _health_rows(name, h)
    n_eval = next((h.get("eval", {}).get("n_prompts") for h in (res.get("dictionaries") or {}).values() if h.get("eval")), None)
    return _table(["dictionary", "partition", "size", "dead (train)", "fire rate (train)", f"dead (eval, n={n_eval})", "fire rate tool", "fire rate plain"], rows)


def _figure(figures: dict[str, str], name: str) -> list[str]:
    """The figure ``name``.png as a Markdown image, if the caller made it."""
    return ["", f"![{name}]({figures[name + '.png']})"] if name + ".png" in figures else []


def _splice_section(res: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Markdown lines for the splice table and figure; none if not measured."""
    sp = res.get("splice")
    if not sp:
        return []
    out = ["", f"## Splice (n = {sp['n_prompts']} tool prompts)", ""]
    rows = []
    for key in ("A_clean", "A_recon_joint", "A_recon_single", "B_clean", "B_recon_joint", "B_recon_single"):
        if key in sp:
            a = sp[key]
            d = sp.get(f"{key}_delta", {})
            rows.append([key, pct(a["tool_correctness"]), pct(a["format_accuracy"]), num(a["overall_score"], "{:+.2f}"), pct(a["name_correct"]),
                         pct(a["args_correct"]), pct(a.get("call_cut")), delta_cell(d.get("tool_correctness")) if d else "",
                         delta_cell(d.get("name_correct")) if d else "", num((a.get("reconstruction") or {}).get("relative_l2"), "{:.3f}")])
    out.append(_table(["condition", "tool corr.", "format", "overall", "strict name", "strict args", "cut mid-call", "Δ tool corr. vs clean",
                       "Δ strict name vs clean", "rel. recon error"], rows))
    out += _figure(figures, "splice")
    return out


def _steering_section(res: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Markdown lines for the steering cells, the selected features and the saturation figure."""
    st = res.get("steering")
    if not st:
        return []
    out = ["", f"## Steering saturation curves (n = {st['n_prompts']} tool prompts, A clean tool correctness {pct(st.get('A_clean', {}).get('tool_correctness'))})", ""]
    rows = []
    for fam, data in st["families"].items():
        if "cells" not in data:
            rows.append([fam, "–", "–", "–", data.get("skipped", ""), ""])
            continue
        for c in data["cells"]:
            rows.append([fam, str(c["size"]), f"{c['alpha']:g}", str(c["rows_changed"]), delta_cell(c["delta"]["tool_correctness"]), pp(c["delta"]["format_accuracy"]["delta"])])
    out.append(_table(["family", "|S|", "α", "rows changed", "Δ tool corr.", "Δ format"], rows))
    sel = {f: d.get("selection") for f, d in st["families"].items() if d.get("selection")}
    out += ["", "Feature selection: " + "; ".join(f"{f}: {s}" for f, s in sel.items())]
    out += _figure(figures, "saturation")
    return out


def _ablation_section(res: dict[str, Any]) -> list[str]:
    """Markdown lines for the exclusive-penalty ablation; none if not measured."""
    ab = res.get("ablation")
    if not ab:
        return []
    out = ["", f"## Exclusive-penalty ablation (n = {ab['n_prompts']} tool prompts)", "",
            f"Settings: {json.dumps(ab['settings'])}", "",
            _table(["dictionary", "Δ_A tool corr. (splice)", "Δ_A format"],
                   [["free (λ_excl=0)", delta_cell(ab["free"]["A_gain"]["tool_correctness"]), pp(ab["free"]["A_gain"]["format_accuracy"]["delta"])],
                    ["penalised", delta_cell(ab["penalised"]["A_gain"]["tool_correctness"]), pp(ab["penalised"]["A_gain"]["format_accuracy"]["delta"])],
                    ["penalised − free", delta_cell(ab["penalised_minus_free"]["tool_correctness"]), pp(ab["penalised_minus_free"]["format_accuracy"]["delta"])]])]
    return out


def _boot_text(boot: dict[str, Any] | None, fmt: Callable[[list], str]) -> str:
    """A prompt-bootstrap interval, or why there is none."""
    if not boot:
        return "–"
    ci = boot.get("ci") or [None, None]
    return fmt(ci) if ci[0] is not None else f"undefined ({boot.get('undefined')})"


def _sweep_section(res: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Markdown lines for the sweep's variants and statistics; none if not measured."""
    sw = res.get("sweep")
    if not sw:
        return []
    out = ["", f"## Sweep ({sw['n_variants']} variants × {sw['n_prompts']} tool prompts)", ""]
    out.append(_table(["variant", "kind", "MSE", "Δ_A tool", "Δ_B tool", "Δ_B format", "dead A-excl (train)"],
                      [[r["name"], r["kind"], num(r.get("mse"), "{:.4f}"), pp(r["dA_tool_correctness"]), pp(r["dB_tool_correctness"]), pp(r["dB_format_accuracy"]),
                        num(((r["dictionary"].get("training") or {}).get("partitions") or {}).get("a_exclusive", {}).get("dead_fraction"), "{:.2f}")]
                       for r in sw["variants"]]))
    s = sw["statistics"]
    pa, pb = s.get("dA_tool_permutation") or {}, s.get("dB_tool_permutation") or {}
    w, r = s["dB_standard_vs_dfc"], s["pearson_mse_vs_dA"]
    out += ["", f"- {s.get('independence', '')}",
            f"- Δ_A > 0: {s['dA_tool_sign_test']['n_pos']}/{s['dA_tool_sign_test']['n']} variants positive; mean {pp(s.get('dA_tool_mean'))}; "
            f"clean-label permutation over {pa.get('n_prompts', '–')} prompts p = {pval(pa.get('p'))}",
            f"- Δ_B > 0: mean {pp(s.get('dB_tool_mean'))}; clean-label permutation over prompts p = {pval(pb.get('p'))}",
            f"- Δ_B standard − DFC: {pp(w.get('mean_standard'))} vs {pp(w.get('mean_dfc'))} (n={w['n']}); prompt bootstrap {_boot_text(w.get('bootstrap'), ci_pp)}",
            f"- Pearson MSE vs Δ_A: r = {num(r['r'], '{:+.3f}')} (n={r['n']}{'; ' + r['undefined'] if r.get('undefined') else ''}); "
            f"prompt bootstrap {_boot_text(r.get('bootstrap'), lambda ci: f'[{ci[0]:+.2f}, {ci[1]:+.2f}]')}"]
    out += _figure(figures, "sweep")
    return out


def _geometry_section(res: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Markdown lines for the decoder geometry; none if not measured."""
    geo = res.get("geometry")
    if not geo:
        return []
    out = ["", f"## Decoder geometry ({geo['method']}, {geo['n_features']} features)", "",
            f"- DFC cluster recovery of the partition: {json.dumps(geo['dfc']['recovery'])}",
            f"- control (standard CC, random matched partition): {json.dumps(geo.get('control', {}).get('recovery'))}",
            f"- mean relative decoder norm ‖d_A‖/(‖d_A‖+‖d_B‖) by partition: {json.dumps(geo['dfc']['relative_decoder_norm_by_partition'])}"]
    if geo.get("a_exclusive_clusters"):
        out.append(f"- A-exclusive features alone, 2 clusters: {json.dumps(geo['a_exclusive_clusters'])}")
    out += _figure(figures, "geometry")
    return out


def _explain_section(res: dict[str, Any]) -> list[str]:
    """Markdown lines for what the top features fire on; none if not measured."""
    ex = res.get("explain")
    if not (ex and ex.get("features")):
        return []
    ending = ex.get("prompt_end_markers")
    out = ["", f"## Feature explanations ({ex['n_prompts']} prompts, {ex['n_tokens']} tokens; template base rate {pct(ex['template_token_fraction'])}"
           + (f"; not counted as template: {', '.join(ending)}, which ends every tool prompt" if ending else "") + ")", ""]
    rows = []
    for f in ex["features"]:
        top = f["top_contexts"][0]["context"] if f["top_contexts"] else ""
        rows.append([str(f["feature"]), f["partition"], num(f["cohens_d"], "{:+.2f}"), num(f["auroc"], "{:.2f}"), pct(f["template_share"]), pct(f["last_token_share"]),
                     f"`{top[-80:]}`" if top else ""])
    out.append(_table(["feature", "partition", "Cohen's d", "AUROC", "template share", "last-token share", "top context"], rows))
    return out


def _ranking_section(res: dict[str, Any]) -> list[str]:
    """Markdown lines for the ranking sidecars; none if not measured."""
    rk = res.get("ranking")
    if not rk:
        return []
    out = ["", "## Feature ranking (tool vs ordinary prompts)", ""]
    for name, r in rk.items():
        out.append(f"- {name}: {r['n_tool']} tool / {r['n_plain']} ordinary prompts; tool-signed per partition {json.dumps(r['tool_signed'])}; sidecar `{r['sidecar']}`")
    return out


def _truncation_lines(res: dict[str, Any]) -> list[str]:
    """The share of outputs cut before a call closed, per clean model, at this run's token budget."""
    sp = res.get("splice") or {}
    budget = (res.get("meta") or {}).get("max_new_tokens")
    cells = [f"{m} {pct(sp[f'{m}_clean'].get('call_cut'))}" for m in ("A", "B") if "call_cut" in (sp.get(f"{m}_clean") or {})]
    if not cells:
        return []
    return ["", f"Outputs cut before a call closed (a `<tool_call>` opened and not closed within {budget} new tokens), clean, "
            f"n = {sp.get('n_prompts')} tool prompts: {', '.join(cells)}; such outputs score 0 on every metric."]


def strict_json(obj: Any, indent: int | None = 1) -> str:
    """JSON that a strict parser accepts: NaN or ±inf anywhere raises instead of writing ``NaN``."""
    return json.dumps(obj, indent=indent, default=str, allow_nan=False)


def render_markdown(res: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """The whole report; ``figures`` maps a PNG name to how to reference it (path or data URI)."""
    meta = res.get("meta", {})
    figures = figures or {}
    out = [f"# guardrail eval — {meta.get('profile', '?')} profile on the {meta.get('pair', '?')} pair", ""]
    out.append(f"Models: A = `{meta.get('model_a')}`, B = `{meta.get('model_b')}`; layer {meta.get('layer')}; backend {meta.get('backend')}; "
               f"greedy, {meta.get('max_new_tokens')} new tokens{' (the paper uses 200)' if meta.get('max_new_tokens') != 200 else ''}; "
               f"prompts rendered {meta.get('render_mode', 'raw')} (no chat template), user turn `{meta.get('turn', 'toolrl')}`; seed {meta.get('seed')}; "
               f"{meta.get('n_generated', '?')} generations in {num(meta.get('duration_s'), '{:.0f}')} s.")
    if meta.get("adapter_sha256"):
        out.append(f"A's adapter: sha256 `{meta['adapter_sha256']}` (`adapter_model.safetensors`).")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    out += ["", "## Paper vs this run", ""]
    out.append(_table(["finding", "paper", "this run (lenient)", "strict (BFCL name / args)", "verdict", "rule"],
                      [[r["finding"], r["paper"], r["run"], r.get("strict", ""), r["verdict"], r.get("why", "")] for r in res.get("paper_vs_run", [])]))
    out += ["", "Verdicts: reproduces (interval excludes 0 in the paper's direction) · same direction, weaker · not reproduced · "
            "no headroom (baseline at floor or ceiling) · sanity check (true by construction) · new (the paper did not measure it) · "
            "undefined (the statistic does not exist here) · not run. Intervals of rates are Newcombe's paired score intervals with an "
            "exact McNemar p; lenient tool correctness is the paper's (a named tool fuzzy-matches any listed tool), strict is BFCL's exact name and arguments."]
    out += _truncation_lines(res)
    out += ["", "## Dictionaries behind the figures (per-partition dead fraction and fire rate)", "", dictionaries_section(res)]
    out += _splice_section(res, figures) + _steering_section(res, figures) + _ablation_section(res)
    out += _sweep_section(res, figures) + _geometry_section(res, figures) + _explain_section(res) + _ranking_section(res)
    out += ["", "Per-prompt outputs: `outputs/*.jsonl` in the run folder (one row per prompt and condition, with the generated text and every score)."]
    return "\n".join(out) + "\n"


def _slim(res: dict[str, Any]) -> dict[str, Any]:
    """results.json without the bulky embedding coordinates (saved to geometry.json)."""
    out = dict(res)
    if "geometry" in out and out["geometry"]:
        g = json.loads(json.dumps(out["geometry"]))
        for key in ("dfc", "control"):
            if key in g:
                g[key].pop("embedding", None)
                g[key].pop("labels", None)
        out["geometry"] = g
    return out


def write_report(res: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json, report.md (PNG files beside it), report.html (PNGs embedded)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res["paper_vs_run"] = [f.as_dict() for f in paper_vs_run(res)]
    images = make_figures(res)
    for name, data in images.items():
        (out / name).write_bytes(data)
    if res.get("geometry"):
        (out / "geometry.json").write_text(strict_json(res["geometry"], indent=None))
    (out / "results.json").write_text(strict_json(_slim(res)))
    md = render_markdown(res, {n: n for n in images})
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(render_page(md, images))
    return {"results": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
