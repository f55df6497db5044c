"""The evaluation report: PNG plots and one self-contained HTML page beside metrics.json."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from clinfuse.evaluation.audit import RISK_SOURCES  # noqa: E402
from clinfuse.evaluation.metrics import calibration_bins  # noqa: E402

# Column headings of the audit's floors (``audit.RISK_SOURCES``).
FLOOR_LABELS = {
    "risk_factor_": "risk-factor floor",
    "risk_marker_": "with the causal genes' dosages",
}


def plot_curves(y: np.ndarray, p: np.ndarray, out_dir: Path) -> dict[str, str]:
    """ROC, precision-recall and calibration plots; returns name -> file name."""
    files = {}
    if len(np.unique(y)) == 2:
        files["roc"] = _plot(out_dir / "roc.png", lambda ax: _roc(ax, y, p))
        files["pr"] = _plot(out_dir / "pr.png", lambda ax: _pr(ax, y, p))
    files["calibration"] = _plot(out_dir / "calibration.png", lambda ax: _calibration(ax, y, p))
    return files


def plot_genotype_path(path: dict[str, Any] | None, out_dir: Path) -> dict[str, str]:
    """The genotype groups' regularization path: groups kept and tuning loss per strength.

    Returns ``{"genotype_path": file name}``, or nothing when training chose no path.
    """
    if not path:
        return {}
    return {
        "genotype_path": _plot(out_dir / "genotype_path.png", lambda ax: _path(ax, path), (5, 4))
    }


def _path(ax, path: dict[str, Any]) -> None:
    lam = np.asarray(path["lambdas"])
    loss, se = np.asarray(path["tuning_loss"]), np.asarray(path["tuning_se"])
    ax.plot(lam, loss, "o-", color="C0", ms=3)
    ax.fill_between(lam, loss - se, loss + se, color="C0", alpha=0.15)
    ax.axvline(path["lambda_"], ls="--", color="gray")
    ax.set(xscale="log", xlabel="lambda (penalty strength)", title="Genotype groups: path")
    ax.set_ylabel("tuning loss (relaxed fit)", color="C0")
    kept = ax.twinx()
    kept.step(lam, path["n_selected"], where="mid", color="C1")
    kept.set_ylabel("groups kept", color="C1")


def save_overlays(
    images: np.ndarray, heatmaps: np.ndarray, captions: list[str], out_dir: Path
) -> list[str]:
    """Grad-CAM heat maps over their images, one PNG each."""
    names = []
    for i, (img, cam, caption) in enumerate(zip(images, heatmaps, captions, strict=True)):

        def draw(ax, img=img, cam=cam, caption=caption):
            ax.imshow(img, cmap="gray")
            ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
            ax.set_title(caption, fontsize=8)
            ax.axis("off")

        names.append(_plot(out_dir / f"gradcam_{i}.png", draw, size=(3, 3)))
    return names


def write_html(
    metrics: dict[str, Any], plots: dict[str, str], overlays: list[str], path: Path
) -> None:
    """One HTML page: headline metrics, plots, subgroup tables, audit, attribution, Grad-CAM."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>clinfuse evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:340px;margin:4px}.warn{color:#a00}</style></head><body>",
        "<h1>clinfuse evaluation</h1>",
        f"<p>Cohort: {html.escape(str(metrics.get('cohort', '')))} &middot; split: "
        f"{html.escape(str(metrics.get('split', '')))} &middot; model: "
        f"{html.escape(str(metrics.get('model_id', ''))[:16])}</p>",
        "<h2>Discrimination and calibration</h2>",
        _table_rows(_headline(metrics)),
        "<h2>Against a gradient-boosting baseline</h2>",
        _baseline(metrics.get("baseline", {})),
        "<h3>The same baseline given the default model's confound treatment</h3>",
        _baseline(metrics.get("baseline_matched", {}), matched=True),
        "".join(
            f"<img src='{html.escape(f)}' alt='{k}'>"
            for k, f in plots.items()
            if k != "genotype_path"
        ),
        "<h2>Per site</h2>",
        _subgroup_table(metrics.get("per_site", {})),
        "<h2>Per ancestry</h2>",
        _subgroup_table(metrics.get("per_ancestry", {})),
        *(["<h2>On a shifted cohort</h2>", _shift(metrics["shift"])] if "shift" in metrics else []),
        "<h2>Confound audit</h2>",
        _audit(metrics.get("audit", {})),
        "<h2>Modality attribution</h2>",
        _attribution(metrics.get("attribution", {})),
        "<h2>Genotype groups</h2>",
        _genomics(metrics.get("genomics", {})),
    ]
    if "genotype_path" in plots:
        parts.append(f"<img src='{html.escape(plots['genotype_path'])}' alt='genotype path'>")
    if overlays:
        parts.append("<h2>Grad-CAM</h2>")
        parts.append("".join(f"<img src='{html.escape(f)}'>" for f in overlays))
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def _headline(m: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key in (
        "n",
        "prevalence",
        "auroc",
        "auprc",
        "oracle_auroc",
        "brier",
        "ece",
        "accuracy",
        "precision",
        "recall",
        "specificity",
        "f1",
        "g_mean",
        "threshold",
    ):
        if key in m:
            value = _fmt(m[key])
            if f"{key}_ci" in m:
                lo, hi = m[f"{key}_ci"]
                value += f" (95% CI {_fmt(lo)}-{_fmt(hi)})"
            rows.append((key, value))
    return rows


def _baseline(base: dict[str, Any], matched: bool = False) -> str:
    """The model's AUROC margin over gradient boosting on fixed features (same samples);
    ``matched``: the baseline with the default's confound treatment."""
    if not base:
        return "<p>not run</p>"
    if "skipped" in base:
        return f"<p>{html.escape(base['skipped'])}</p>"
    low, high = base["delta_ci"]
    verdict = "above" if low > 0 else "below" if high < 0 else "not distinguishable from"
    what = (
        "The baseline above with ComBat on the film features, each sample's site and "
        "ancestry as two columns in training, and every score averaged over the training "
        "split's (site, ancestry) pairs: the like-for-like peer of a model made not to "
        "lean on them "
        if matched
        else "scikit-learn <code>HistGradientBoostingClassifier</code> on fixed per-modality "
        "features (per-channel last/mean/min/max/count/hours since last in the window, raw "
        "dosages, the frozen image backbone's pooled features), fit on this run's training "
        "split and early stopped on its tuning split "
    )
    return f"<p>{what}({base['n_features']} features, {base['n_iter']} trees).</p>" + _table_rows(
        [
            (
                "baseline AUROC",
                f"{_fmt(base['auroc'])} (95% CI {_fmt(base['auroc_ci'][0])}-"
                f"{_fmt(base['auroc_ci'][1])})",
            ),
            (
                "model - baseline",
                f"{base['delta']:+.3f} (paired bootstrap 95% CI {low:+.3f} to {high:+.3f})",
            ),
            ("verdict", f"the model is {verdict} the baseline"),
        ]
    )


def _shift(shift: dict[str, Any]) -> str:
    """The model on every sample of a second cohort, and its AUROC drop from this split."""
    low, high = shift["drop_ci"]
    rows = [
        ("shifted cohort", html.escape(shift["cohort"])),
        ("samples (prevalence)", f"{shift['n']} ({_fmt(shift['prevalence'])})"),
        (
            "AUROC",
            f"{_fmt(shift['auroc'])} (95% CI {_fmt(shift['auroc_ci'][0])}-"
            f"{_fmt(shift['auroc_ci'][1])})",
        ),
        (
            "drop from this split",
            f"{shift['drop']:+.3f} (bootstrap 95% CI {low:+.3f} to {high:+.3f})",
        ),
    ]
    if "shifted_oracle_auroc" in shift:
        rows.append(("oracle AUROC on the shifted cohort", _fmt(shift["shifted_oracle_auroc"])))
    return (
        "<p>Every labelled sample of a second cohort, e.g. the same world with the site or "
        "ancestry link to the outcome reversed: a model that leans on the confound loses "
        "more here than one that does not.</p>"
        + _table_rows(rows)
        + "<p>Per site on the shifted cohort:</p>"
        + _subgroup_table(shift.get("per_site", {}))
    )


def _subgroup_table(groups: dict[str, dict[str, Any]]) -> str:
    if not groups:
        return "<p>none</p>"
    head = "<tr><th>group</th><th>n</th><th>prevalence</th><th>AUROC</th><th>ECE</th><th>mean risk</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{g.get('n')}</td><td>{_fmt(g.get('prevalence'))}</td>"
        f"<td>{_fmt(g.get('auroc'))}</td><td>{_fmt(g.get('ece'))}</td><td>{_fmt(g.get('mean_risk'))}</td></tr>"
        for name, g in groups.items()
    )
    return f"<table>{head}{rows}</table>"


def _audit(audit: dict[str, Any]) -> str:
    if not audit:
        return "<p>not run</p>"
    floors = [
        (src, FLOOR_LABELS[src])
        for src in RISK_SOURCES
        if any(isinstance(a, dict) and f"{src}probe_accuracy" in a for a in audit.values())
    ]
    head = (
        "<tr><th>confound</th><th>probe accuracy (logistic)</th><th>probe accuracy (MLP)</th>"
        "<th>probe accuracy (trees)</th>"
        + "".join(f"<th>{label} (logistic / MLP / trees)</th>" for _, label in floors)
        + "<th>majority rate</th><th>probe balanced acc.</th><th>chance</th><th>n</th></tr>"
    )
    flagged = _flagged(audit)
    sources = [src for src, _ in floors]
    rows = "".join(
        _audit_row(name, a, sources, flagged) for name, a in audit.items() if _is_probe(a)
    )
    note = (
        "<p>Fresh cross-validated probes (logistic regression and a one-hidden-layer MLP) on "
        "the frozen embeddings of these patients. Probe accuracy well above the majority rate "
        "(red) means the representation still encodes the confound, whatever the adversary's "
        "training loss said. The risk-factor floor, when the cohort has the simulator's "
        "oracle, is what the same probes read from the true risk factors alone: a "
        "representation that carries the risk cannot go below it. The causal genes' "
        "dosages (when the cohort names them) also differ between populations: a model "
        "that reads those genes cannot go below what the same probes read from them "
        "with the risk factors.</p>"
    )
    loso = audit.get("leave_one_site_out_auroc") or {}
    loso_html = _table_rows(
        [(k, _fmt(v)) for k, v in loso.items()], "left-out site", "outcome AUROC"
    )
    return (
        f"{note}{_verdict(audit.get('verdict'))}<table>{head}{rows}</table>"
        f"{_audit_by_modality(audit, flagged)}"
        f"{_genetic_signal(audit.get('genetic_signal'))}"
        f"<h3>Leave-one-site-out outcome probe</h3>{loso_html}"
    )


def _verdict(verdict: dict[str, Any] | None) -> str:
    """The audit's verdict: every probe against max(majority, risk-factor probe) + 2 s.e."""
    if not verdict:
        return ""
    rule = (
        "Each probe (logistic, MLP, gradient-boosted trees; on the fused representation and "
        "on each modality's embedding) is held to its floor, max(majority rate, the same "
        "probe on the true risk factors when known, the same probe on them with the "
        "causal genes' dosages when known), plus two binomial standard errors."
    )
    if verdict["passed"]:
        return (
            f"<p class='verdict'>{rule} <b>All {verdict['checked']} probes are within it.</b></p>"
        )
    items = "".join(
        f"<li>{html.escape(a['confound'])} from {html.escape(a['representation'])} "
        f"({html.escape(a['probe'])}): {_fmt(a['accuracy'])} &gt; {_fmt(a['limit'])} "
        f"(floor {_fmt(a['floor'])})</li>"
        for a in verdict["above"]
    )
    return (
        f"<p class='verdict warn'>{rule} <b>{len(verdict['above'])} of {verdict['checked']} "
        f"probes read the confound above it:</b></p><ul>{items}</ul>"
    )


def _genetic_signal(signal: dict[str, Any] | None) -> str:
    """One line: the true genetic signal read from the genotype and fused representations."""
    if not signal:
        return ""

    def read(prefix: str) -> str:
        return (
            f"carrier AUROC {_fmt(signal.get(prefix + 'carrier_auroc'))}, "
            f"genetic score R<sup>2</sup> {_fmt(signal.get(prefix + 'genetic_score_r2'))}, "
            f"outcome AUROC {_fmt(signal.get(prefix + 'outcome_auroc'))}"
        )

    return (
        "<h3>Genetic signal kept</h3><p class='genetic-signal'>Linear probes over the "
        f"{signal.get('n')} patients with genotypes: genotype embedding {read('')}; "
        f"fused representation {read('fused_')}. Confound treatment should leave these "
        "where the untreated model has them.</p>"
    )


def _audit_by_modality(audit: dict[str, Any], flagged: set | None = None) -> str:
    """Probe accuracy (logistic / MLP) per confound and modality embedding, before fusion."""
    probes = {
        name: a["by_modality"] for name, a in audit.items() if _is_probe(a) and a.get("by_modality")
    }
    if not probes:
        return ""
    modalities = list(dict.fromkeys(m for by in probes.values() for m in by))
    head = "<tr><th>confound</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in modalities)
    rows = []
    for name, by in probes.items():
        cells = []
        for m in modalities:
            p = by.get(m)
            if p is None:
                cells.append("<td></td>")
                continue
            cells.append(
                f"<td{_warn_class(p, flagged, (name, m))}>{_fmt(p['probe_accuracy'])} / "
                f"{_fmt(p['mlp_probe_accuracy'])}"
                f" / {_fmt(p.get('gbt_probe_accuracy'))} "
                f"(majority {_fmt(p['majority_rate'])}, n {p['n']})</td>"
            )
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return (
        "<h3>Where the confound enters</h3><p>The same probes (logistic / MLP / trees) on each "
        "modality's own embedding, before fusion, over the patients that have it.</p>"
        f"<table>{head}</tr>{''.join(rows)}</table>"
    )


def _is_probe(a: Any) -> bool:
    return isinstance(a, dict) and "probe_accuracy" in a


def _flagged(audit: dict[str, Any]) -> set | None:
    """(confound, representation) pairs the audit's verdict puts above their floor, or
    None for an audit written before the verdict existed."""
    verdict = audit.get("verdict")
    if verdict is None:
        return None
    return {(a["confound"], a["representation"]) for a in verdict["above"]}


def _warn_class(a: dict[str, Any], flagged: set | None = None, key: tuple = ()) -> str:
    """The red class for a probe above its floor + 2 s.e. (the verdict); without a
    verdict, for one 0.05 above the majority rate."""
    if flagged is not None:
        return " class='warn'" if key in flagged else ""
    accs = [a.get(f"{k}probe_accuracy", float("nan")) for k in ("", "mlp_", "gbt_")]
    best = max((x for x in accs if x == x), default=float("-inf"))
    return " class='warn'" if best - a["majority_rate"] > 0.05 else ""


def _audit_row(name: str, a: dict[str, Any], floors: list[str], flagged: set | None = None) -> str:
    cls = _warn_class(a, flagged, (name, "fused"))
    floor_cell = "".join(
        f"<td>{_fmt(a.get(f'{src}probe_accuracy'))} / "
        f"{_fmt(a.get(f'{src}mlp_probe_accuracy'))} / "
        f"{_fmt(a.get(f'{src}gbt_probe_accuracy'))}</td>"
        for src in floors
    )
    return (
        f"<tr{cls}><td>{html.escape(name)}</td><td>{_fmt(a['probe_accuracy'])}</td>"
        f"<td>{_fmt(a.get('mlp_probe_accuracy'))}</td>"
        f"<td>{_fmt(a.get('gbt_probe_accuracy'))}</td>{floor_cell}"
        f"<td>{_fmt(a['majority_rate'])}</td><td>{_fmt(a['probe_balanced_accuracy'])}</td>"
        f"<td>{_fmt(a['chance_balanced'])}</td><td>{a['n']}</td></tr>"
    )


def _attribution(attr: dict[str, Any]) -> str:
    if not attr:
        return "<p>none</p>"
    return _table_rows([(k, _fmt(v)) for k, v in attr.items()], "measure", "value")


def _genomics(g: dict[str, Any]) -> str:
    if not g:
        return "<p>no sparse-group-lasso genotype encoder</p>"
    selected = f"{len(g['selected_groups'])} of {g['n_groups']}: " + ", ".join(g["selected_groups"])
    rows = [("selected groups", selected)]
    if "causal_groups" in g:
        rows += [
            ("causal groups (simulator truth)", ", ".join(g["causal_groups"])),
            ("precision", _fmt(g["group_precision"])),
            ("recall", _fmt(g["group_recall"])),
        ]
    path = g.get("path")
    if path:
        rows += [
            (
                "penalty strength",
                f"lambda {path['lambda_']:.3g}, chosen on the tuning split ({path['rule']} rule "
                f"on the relaxed fits; {path['ancestry_pcs']} ancestry PCs adjusted for)",
            ),
            (
                "path",
                "; ".join(
                    f"{lam:.3g}: {n}"
                    for lam, n in zip(path["lambdas"], path["n_selected"], strict=True)
                ),
            ),
        ]
        if path.get("interaction"):
            env = path.get("environment") or {}
            score = f", its cross-fitted AUROC {env['train_auroc']:.3f}" if env else ""
            kept = ", ".join(path.get("interaction_groups", [])) or "none"
            rows.append((
                "gene x environment",
                f"every gene also tested for changing the effect of the vitals/labs risk "
                f"score{score}; kept for that: {kept}",
            ))  # fmt: skip
    return _table_rows(rows, "measure", "value")


def _table_rows(rows: list[tuple[str, str]], h1: str = "metric", h2: str = "value") -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table><tr><th>{h1}</th><th>{h2}</th></tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _plot(path: Path, draw, size: tuple[float, float] = (4, 4)) -> str:
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _roc(ax, y, p) -> None:
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")


def _pr(ax, y, p) -> None:
    precision, recall, _ = precision_recall_curve(y, p)
    ax.plot(recall, precision)
    ax.axhline(np.mean(y), ls="--", color="gray")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")


def _calibration(ax, y, p) -> None:
    bins = calibration_bins(y, p)
    used = bins["count"] > 0
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.plot(bins["mean_predicted"][used], bins["observed_rate"][used], "o-")
    ax.set(
        xlabel="predicted risk",
        ylabel="observed rate",
        title="Calibration",
        xlim=(0, 1),
        ylim=(0, 1),
    )
