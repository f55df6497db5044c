"""Model quality on simulator cohorts: fusion strategies, confound flip, transfer learning.

Three experiments, each a table of real training runs (``training.run.train``)
scored by ``evaluation.evaluate``:

* ``strategies``: held-out AUROC (bootstrap 95% CI) of attention, early, late and
  gated fusion and of every single-modality model, against the oracle AUROC of
  the simulator's true risk on the same subjects.
* ``confound``: attention fusion trained with and without the confound
  adversary; AUROC on the training cohort's held-out split vs on a confound-flip
  cohort of the same world (site effect reversed, plus a new site), and a
  post-hoc linear and MLP probe of site and ancestry on the fused representation.
* ``missing``: the preset, the four fusion strategies and the boosting peers on cohorts
  where a share of subjects has no film (0.25 / 0.5 / 0.75, informative by default:
  sicker patients are filmed more often) or was never genotyped (0.5 / 0.9), missing
  in training and at test; each row's drop from its own complete-data run.
* ``transfer``: image-only models, ImageNet-pretrained (package weights) vs
  scratch, fine-tuned end to end, plus the frozen pretrained backbone (linear
  probe baseline), at several shares of the training labels; ``--transfer-modes``
  adds BatchNorm-only, batch-statistics and gradual-unfreezing rows.

The strategies table also has the two rows a user compares us with: ``preset``
(exactly ``configs/demo.yaml``, its confound treatment included, on the bench's
cohort and schedule) and ``gbdt_features`` (the HAIM-style peer of
``evaluation.baseline``: gradient boosting on fixed per-modality features; and
``gbdt_confound_matched``, the same peer with the default's confound treatment), plus
``--candidates FILE`` rows (named lists of ``key=value`` edits of the preset, the
settings tried for it) and a paired-bootstrap table of preset vs peers.

``--seeds 0 1 2`` trains every row once per training seed (same cohort, so the
ceilings do not move) and writes ``<experiment>_seeds.md`` with each row's mean,
s.d., min and max across seeds next to the per-seed table: the bootstrap CI says how
much the held-out sample moves a number, the seed spread how much training does.

Frozen backbones share one feature cache (``timm_image.cache_dir``) and all runs
share one decoded-image cache, so repeated runs skip the CNN and the DICOM
decoding. A run whose directory already holds a result for the same config is
reused, so an interrupted benchmark resumes where it stopped. The strategies
table also lists each row's latent-factor ceiling (``simulation.oracle``) and a
logistic stack of the three single-modality models.

    # end to end at a small size (a few minutes on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py \
        --experiment all --subjects 600 --epochs 2 --out runs/bench_fusion_small
    # the reported sizes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py \
        --experiment strategies --subjects 5000 --epochs 15 --patience 4 --seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py \
        --experiment confound --subjects 5000 --epochs 15 --patience 4 --seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py \
        --experiment missing --subjects 5000 --epochs 15 --patience 4 --seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fusion.py \
        --experiment transfer --subjects 3000 --epochs 15 --patience 4 --adversary off \
        --transfer-modes pretrained_frozen pretrained_full pretrained_bn \
        pretrained_full_bn_update scratch_full
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import clinfuse  # noqa: F401  (installs the compat shim before timm/torch imports)
from clinfuse.config import apply_overrides, from_dict, load_yaml, to_dict
from clinfuse.evaluation.evaluate import discrimination, evaluate, run_genetic_signal
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.artifact import load_artifact
from clinfuse.training.config import RunConfig
from clinfuse.training.run import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE_PRESET = CONFIGS / "bench_fusion.yaml"
# The preset a user gets (``make demo``, ``clinfuse train`` without --config).
USER_PRESET = CONFIGS / "demo.yaml"
# The preset the confound treatments were developed from (the default before them, with
# the confusion adversary): the shift experiment's treatments are edits of it, and its
# reference is it trained without either link.
SHIFT_BASE = CONFIGS / "adversary.yaml"
EXPERIMENTS = ("strategies", "confound", "transfer", "missing", "shift")
# The shift experiment: SHIFT_BASE edits per treatment (the untreated model drops its
# adversary; pcs adds the genotype principal-component adjustment; offsets profiles
# per-site and per-ancestry logit offsets out of training, fusion/offsets.py; path
# selects the genotype groups, encoders/sgl_path.py).
NO_ADVERSARY = "model.adversary.enabled=false"
OFFSETS = "model.confound_offsets=[site,ancestry]"
PCS = ("data.genotype_pcs=5", "model.encoders.sgl_mlp.ancestry_pcs=5")
COMBAT = "model.encoders.timm_image.harmonize=combat"
# The genotype encoder reads only the groups the ancestry-adjusted path keeps, unpenalized.
PATH = (
    "model.encoders.sgl_mlp.select=path",
    "model.encoders.sgl_mlp.lambda_=0.0",
    "model.encoders.sgl_mlp.path_pcs=5",
    "data.genotype_pcs=5",
)
# The path also keeps genes that change the effect of physiology (gene x environment
# twin groups, encoders/sgl_path.py); with twice the candidate groups, a false-selection
# bound of 1 counts the same strengths as 2 does over the genes alone.
GXE = (
    "model.encoders.sgl_mlp.path_interaction=timeseries",
    "model.encoders.sgl_mlp.path_max_false=1.0",
)
SHIFT_TREATMENTS: dict[str, tuple[str, ...]] = {
    "adversary": (),
    "untreated": (NO_ADVERSARY,),
    "pcs": PCS,
    "offsets": (OFFSETS,),
    "offsets_no_adversary": (OFFSETS, NO_ADVERSARY),
    "combat": (COMBAT,),
    "combat_offsets": (COMBAT, OFFSETS),
    "combat_offsets_pcs": (COMBAT, OFFSETS, *PCS),
    # Offsets with only the selected (causal) genes read and no adversary: the model's
    # differences between ancestries can then come only from those genes, which keeps
    # the true genetic difference between populations that PC adjustment removes.
    "path_offsets": (*PATH, OFFSETS, NO_ADVERSARY),
    "combat_path_offsets": (COMBAT, *PATH, OFFSETS, NO_ADVERSARY),
    # The same with the modifier gene kept (gene x environment selection).
    "path_offsets_gxe": (*PATH, *GXE, OFFSETS, NO_ADVERSARY),
    "combat_path_offsets_gxe": (COMBAT, *PATH, *GXE, OFFSETS, NO_ADVERSARY),
    # The same, early stopped and checkpointed on the tuning AUROC within site x
    # ancestry cells, which a shortcut through the confounds cannot raise.
    "combat_path_offsets_gxe_within": (
        COMBAT,
        *PATH,
        *GXE,
        OFFSETS,
        NO_ADVERSARY,
        "optim.monitor=val_auroc_stratified",
    ),
}
# The missing experiment: (modality, share of subjects without it) per cohort;
# ("none", 0.0) is the complete-data reference every drop is measured from.
MISSING_GRID = (
    ("none", 0.0),
    ("image", 0.25),
    ("image", 0.5),
    ("image", 0.75),
    ("genotypes", 0.5),
    ("genotypes", 0.9),
)
MISSING_ROWS = ("preset", "fusion_attention", "fusion_early", "fusion_late", "fusion_gated")
MODALITY_ENCODER = {"image": "timm_image", "vitals/labs": "gru_d", "genotypes": "sgl_mlp"}
ALL_MODALITIES = tuple(MODALITY_ENCODER)
# ``simulation.oracle.FEATURE_SETS`` entry of the latent factors a modality (set) can see.
CEILING_SET = {"image": "image", "vitals/labs": "timeseries", "genotypes": "genomics"}
# Ceiling rows of the strategies table: row label -> ``simulation.oracle.FEATURE_SETS`` entry.
CEILING_ROWS = {
    "additive": "fused_additive",
    "interaction": "fused_interaction",
    "interaction_site": "fused_interaction_site",
}
FEATURE_LABELS = {
    "fused_additive": ("L", "P", "G", "C"),
    "fused_interaction": ("L", "P", "G", "C", "PxC"),
    "fused_interaction_site": ("L", "P", "G", "C", "PxC", "site"),
}
# Rows of the transfer table: label -> (transfer mode, weights, timm_image edits).
TRANSFER_ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pretrained_full": ("full", "package", {}),
    # The same with BatchNorm normalizing by batch statistics (bn_stats "update"
    # instead of the pretrained running ones).
    "pretrained_full_bn_update": ("full", "package", {"bn_stats": "update"}),
    "scratch_full": ("full", "none", {}),
    "pretrained_frozen": ("frozen", "package", {}),
    "pretrained_bn": ("bn", "package", {}),
    # ULMFiT-style: the top two depth groups first, one more every two epochs.
    "pretrained_partial": ("partial", "package", {"trainable_stages": 2, "unfreeze_every": 2}),
}
DEFAULT_TRANSFER_ROWS = ("pretrained_full", "scratch_full", "pretrained_frozen")
RESULT_FILE = "bench_result.json"
TARGET_RATIO = 0.97


@dataclass(frozen=True)
class Variant:
    """One row of a table: a name and the edits applied to the base preset."""

    name: str
    modalities: tuple[str, ...] = ALL_MODALITIES
    fusion: str = "attention"
    adversary: bool = True
    transfer: str = "frozen"
    weights: str = "package"
    label_fraction: float = 1.0
    fusion_cfg: tuple[tuple[str, Any], ...] = ()  # edits of the preset's fusion cfg
    image_cfg: tuple[tuple[str, Any], ...] = ()  # edits of the timm_image encoder's cfg
    seed: int = 0  # training seed (init, dropout, batch order); the cohort stays the same
    preset: str = ""  # a YAML whose data/model/optim replace the base preset's (row "preset")
    overrides: tuple[str, ...] = ()  # ``key=value`` edits of ``preset`` (candidate rows)

    @property
    def run_name(self) -> str:
        """The run directory's name: ``name`` for seed 0 (so earlier runs are reused)."""
        return self.name if self.seed == 0 else f"{self.name}_seed{self.seed}"


# ------------------------------------------------------------------ cohorts


def make_cohorts(
    root: Path,
    subjects: int,
    flip_subjects: int,
    image_size: int,
    site_effect: str = "normal",
    cohort_seed: int = 0,
) -> dict[str, Path]:
    """The training cohort and a confound-flip cohort of the same world (simulated once).

    ``site_effect`` is the training cohort's link between site and outcome (the
    simulator's default ``normal``; ``none`` leaves no site shortcut to read). The flip
    cohort always reverses it. ``cohort_seed`` draws the training cohort's subjects
    (the simulator's ``seed``; the world, ``world_seed`` 0, stays), the flip cohort's
    with ``cohort_seed + 1``; 0 is the cohort every table was measured on.

    Returns:
        ``{"train": dir, "flip": dir}``.
    """
    train_cfg = SimConfig(
        n_subjects=subjects,
        image_size=image_size,
        seed=cohort_seed,
        site_effect=site_effect,
        progress=False,
    )
    flip_cfg = SimConfig(
        n_subjects=flip_subjects,
        image_size=image_size,
        seed=cohort_seed + 1,
        site_effect="reversed",
        new_site=True,
        progress=False,
    )
    draw = _draw_suffix(cohort_seed)
    return {
        "train": _simulate_once(
            root / f"cohort_n{subjects}_s{image_size}{draw}{_site_suffix(site_effect)}", train_cfg
        ),
        "flip": _simulate_once(root / f"flip_n{flip_subjects}_s{image_size}{draw}", flip_cfg),
    }


def _draw_suffix(cohort_seed: int) -> str:
    """Cohort folder suffix: none for the subjects every table used, else ``_c<seed>``."""
    return "" if cohort_seed == 0 else f"_c{cohort_seed}"


def _site_suffix(site_effect: str) -> str:
    """Cohort folder suffix: none for the simulator's default link, else ``_site<link>``."""
    return "" if site_effect == "normal" else f"_site{site_effect}"


def _simulate_once(path: Path, cfg: SimConfig) -> Path:
    if (path / "simulation.yaml").is_file():
        return path
    start = time.perf_counter()
    simulate_cohort(path, cfg)
    print(f"simulated {cfg.n_subjects} subjects -> {path} in {time.perf_counter() - start:.0f} s")
    return path


# ------------------------------------------------------------------ configs


def build_config(variant: Variant, base: dict[str, Any], cohort: Path, caches: Path) -> RunConfig:
    """The RunConfig of ``variant``: the base preset with the variant's edits."""
    if variant.preset:
        return _preset_config(variant, base, cohort, caches)
    data = copy.deepcopy(base)
    data["cohort"] = str(cohort)
    data["seed"] = variant.seed
    data["data"]["label_fraction"] = variant.label_fraction
    data["data"]["cache_dir"] = str(caches / "images")
    model = data["model"]
    model["encoders"] = _encoders(variant, model["encoders"], caches)
    if variant.fusion != model["fusion"]["name"]:
        model["fusion"] = {"name": variant.fusion, "cfg": {}}
    model["fusion"].setdefault("cfg", {}).update(dict(variant.fusion_cfg))
    if len(variant.modalities) == 1:
        model["modality_dropout"] = 0.0
    model["adversary"]["enabled"] = variant.adversary
    return from_dict(RunConfig, data)


def _preset_config(variant: Variant, base: dict[str, Any], cohort: Path, caches: Path) -> RunConfig:
    """Exactly ``variant.preset``'s model and optimizer, on the bench's cohort and schedule.

    Only what every row shares is taken from the bench: image size, epochs and
    patience, the caches (a frozen backbone reads the same features either way) and
    quiet logging.
    """
    data = apply_overrides(load_yaml(variant.preset), list(variant.overrides))
    data["cohort"] = str(cohort)
    data["seed"] = variant.seed
    data.setdefault("data", {}).update(
        image_size=base["data"]["image_size"], cache_dir=str(caches / "images")
    )
    schedule = {k: base["optim"][k] for k in ("max_epochs", "patience", "progress_bar")}
    data.setdefault("optim", {}).update(schedule)
    image = data["model"]["encoders"].get("timm_image")
    if image is not None and image.get("transfer", "frozen") == "frozen":
        image["cache_dir"] = str(caches / "features")
    return from_dict(RunConfig, data)


def _encoders(variant: Variant, encoders: dict[str, Any], caches: Path) -> dict[str, Any]:
    keep = {MODALITY_ENCODER[m] for m in variant.modalities}
    out = {name: dict(kwargs) for name, kwargs in encoders.items() if name in keep}
    image = out.get("timm_image")
    if image is not None:
        image.update(transfer=variant.transfer, weights=variant.weights)
        frozen = variant.transfer == "frozen"
        image["cache_dir"] = str(caches / "features") if frozen else ""
        image["augment"] = not frozen  # a cached backbone never sees augmented films
        image.update(dict(variant.image_cfg))
    return out


# ------------------------------------------------------------------ runs


def run_variant(
    variant: Variant, cfg: RunConfig, cohort: Path, runs: Path, n_bootstrap: int
) -> dict[str, Any]:
    """Trains (or reuses) one variant and evaluates it on the cohort's held-out split.

    Returns:
        ``{"train_s", "epochs", "best_val_auroc", "metrics"}`` with the evaluation metrics.
    """
    run_dir = runs / variant.run_name
    cached = _cached_result(run_dir, cfg)
    if cached is not None:
        return cached
    config = to_dict(cfg)  # as asked: training may fill in choices (the genotype path's genes)
    start = time.perf_counter()
    summary = train(cfg, run_dir)
    seconds = time.perf_counter() - start
    # No per-run baseline: the gbdt_features row is the same baseline, fit once per seed.
    metrics = evaluate(
        run_dir,
        cohort,
        run_dir / "evaluation",
        "held_out",
        n_bootstrap,
        gradcam_images=0,
        baseline=False,
    )
    result = {
        "config": config,
        "train_s": seconds,
        "fit_s": summary.get("fit_seconds"),
        "epochs": summary["epochs"],
        "best_val_auroc": summary["best_val_auroc"],
        "metrics": metrics,
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    print(f"  {variant.run_name}: AUROC {metrics['auroc']:.3f}, trained in {seconds:.0f} s")
    return result


def _cached_result(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    # The stored config read by today's code: options added since it was written take
    # their defaults, which reproduce the old behaviour, so they do not force a rerun.
    try:
        stored = to_dict(from_dict(RunConfig, result["config"]))
    except (TypeError, ValueError, KeyError):
        return None
    same = json.dumps(stored, default=str) == json.dumps(to_dict(cfg), default=str)
    return result if same else None


@dataclass
class Context:
    """What every experiment needs: base preset, cohorts, output folders, settings."""

    base: dict[str, Any]
    cohorts: dict[str, Path]
    out: Path
    n_bootstrap: int
    user_preset: Path = USER_PRESET
    cache: Path | None = None  # feature and film caches (default: out / "cache")
    film_size: int = 0  # side of the simulated films (0 = the models' image size)
    cohort_seed: int = 0  # the simulator seed that drew the cohorts' subjects

    @property
    def caches(self) -> Path:
        return self.cache or self.out / "cache"

    @property
    def film_side(self) -> int:
        """Side of the films simulated for the experiment's own cohorts."""
        return self.film_size or int(self.base["data"]["image_size"])

    def within(self, cohorts: dict[str, Path], out: Path) -> Context:
        """This context on other cohorts and another output folder, sharing its caches."""
        return replace(self, cohorts=cohorts, out=out, cache=self.caches)

    def run(self, variant: Variant, cohort: str = "train") -> dict[str, Any]:
        """Trains and evaluates ``variant`` on one of the cohorts."""
        cfg = build_config(variant, self.base, self.cohorts[cohort], self.caches)
        return run_variant(variant, cfg, self.cohorts[cohort], self.out / "runs", self.n_bootstrap)


# ------------------------------------------------------------------ experiments

# The boosting peer given the default model's confound treatment, and the same without
# ComBat (site and ancestry columns in training, averaged out of every score).
GBDT_MATCHED = "gbdt_confound_matched"
GBDT_OFFSETS = "gbdt_confound_offsets"
GBDT_CONFOUNDS = {"gbdt_features": "none", GBDT_MATCHED: "matched", GBDT_OFFSETS: "offsets"}
# Row-name prefix of a trained row stacked with each site-blind peer.
STACK_PREFIX = {GBDT_MATCHED: "stacked_gbdt_", GBDT_OFFSETS: "stacked_gbdt_offsets_"}


def strategies(
    ctx: Context,
    adversary: bool = True,
    only: list[str] | None = None,
    seeds: tuple[int, ...] = (0,),
    candidates: dict[str, list[str]] | None = None,
    stack: tuple[str, ...] = (),
    stack_gbdt: tuple[str, ...] = (),
    stack_peers: tuple[str, ...] = (GBDT_MATCHED,),
) -> list[dict[str, Any]]:
    """Every fusion strategy and every single-modality model on one cohort.

    Args:
        ctx: the benchmark context.
        adversary: train every row with the confound adversary (names get
            ``_no_adv`` without it).
        only: keep only these row names (None = all).
        seeds: training seeds; every row is trained once per seed (the cohort, its
            splits and so the ceilings stay the same).
        candidates: name -> ``key=value`` edits of the user preset; each becomes a row
            ``candidate_<name>`` (settings tried for the preset, side by side with it).
        stack: candidate names (single-modality edits of the preset) whose logits a
            logistic regression stacks into the row ``stacked_candidates``: the stack
            of singles trained with the preset's own encoder settings.
        stack_gbdt: row names (the preset or candidates) each stacked with the
            confound-matched boosting peer into a row ``stacked_gbdt_<name>``
            (``stacked_with_gbdt``), and with each other peer of ``stack_peers``.
    """
    suffix = "" if adversary else "_no_adv"
    fusions = ("attention", "early", "late", "gated")
    variants = [Variant(f"fusion_{f}{suffix}", fusion=f, adversary=adversary) for f in fusions]
    variants.insert(1, _token_variant(ctx.base, adversary, suffix))
    variants += [
        Variant(f"only_{m.split('/')[0]}{suffix}", (m,), "early", adversary) for m in ALL_MODALITIES
    ]
    variants.insert(0, Variant("preset", preset=str(ctx.user_preset)))
    for i, (cand, edits) in enumerate((candidates or {}).items()):
        row = Variant(f"candidate_{cand}", preset=str(ctx.user_preset), overrides=tuple(edits))
        variants.insert(1 + i, row)
    variants = [v for v in variants if only is None or v.name in only]
    scores = _ceiling_scores(ctx.cohorts["train"])
    ceilings = _ceilings(scores)
    rows = []
    for seed in seeds:
        seeded = [replace(v, seed=seed) for v in variants]
        rows += [_strategy_row(v, ctx.run(v), ceilings) for v in seeded]
        for peer in GBDT_CONFOUNDS:
            if only is None or peer in only:
                rows.append(gbdt_features(ctx, seed, ceilings["fused_interaction"], peer))
        singles = [v.run_name for v in seeded if len(v.modalities) == 1]
        if len(singles) == len(ALL_MODALITIES):
            rows.append(stacked_singles(ctx, singles, ceilings["fused_additive"], seed))
        if stack:
            names = [replace(Variant(f"candidate_{c}"), seed=seed).run_name for c in stack]
            row = stacked_singles(
                ctx, names, ceilings["fused_additive"], seed, name="stacked_candidates"
            )
            rows.append(row)
        for name in stack_gbdt:
            for peer_name in stack_peers:
                row = stacked_with_gbdt(ctx, name, seed, ceilings["fused_interaction"], peer_name)
                rows.append(row)
    return rows + ceiling_rows(scores, ctx.n_bootstrap)


# Paired comparisons of the strategies table: (row a, row b), AUROC(a) - AUROC(b).
PAIRS = (
    ("preset", "gbdt_features"),
    ("preset", GBDT_MATCHED),
    ("preset", "fusion_early"),
    ("fusion_attention", "fusion_early"),
    ("fusion_attention", "gbdt_features"),
)


def gbdt_features(
    ctx: Context, seed: int, ceiling: float, model: str = "gbdt_features"
) -> dict[str, Any]:
    """The HAIM-style peer: gradient boosting on fixed per-modality features.

    ``evaluation.baseline`` on the bench cohort's train split (the same split and
    DataSpec settings as every other row), early stopped on tuning, scored on
    held_out. Its held-out logits are kept (``held_out_logits.npy``) for the
    paired comparisons. ``model`` ``gbdt_confound_matched`` is the same peer with the
    default model's confound treatment (``BaselineConfig.confounds = "matched"``: ComBat
    on the film features, site and ancestry read in training, averaged out of every
    score).
    """
    import numpy as np

    from clinfuse.evaluation.evaluate import _oracle
    from clinfuse.evaluation.metrics import auroc, bootstrap_ci

    name = model if seed == 0 else f"{model}_seed{seed}"
    run_dir = ctx.out / "runs" / name
    if (run_dir / RESULT_FILE).is_file():
        return json.loads((run_dir / RESULT_FILE).read_text())
    cohort = ctx.cohorts["train"]
    samples, spec, cfg = samples_and_spec(ctx, Variant("fusion_early"))
    image = _gbdt_image_source(ctx, spec, cfg)
    start = time.perf_counter()
    fitted = _fit_peer(ctx, samples, spec, image, model, seed)
    held = samples.filter(_split_filter("held_out"))
    logit = fitted.logit(cohort, held)  # (N,)
    seconds = time.perf_counter() - start
    y = held["label"].cast(int).to_numpy()
    low, high = bootstrap_ci(auroc, y, logit, ctx.n_bootstrap)
    oracle = _oracle(cohort, held, y).get("oracle_auroc", float("nan"))
    row = {
        "model": model,
        "seed": seed,
        "modalities": "+".join(ALL_MODALITIES),
        "fusion": (
            f"gradient boosting, {fitted.n_features} fixed features, "
            f"confounds {GBDT_CONFOUNDS[model]}"
        ),
        "n_held_out": int(y.size),
        "auroc": auroc(y, logit),
        "ci_low": low,
        "ci_high": high,
        "oracle_auroc": oracle,
        "ratio": auroc(y, logit) / oracle,
        "ceiling_auroc": ceiling,
        "epochs": fitted.n_iter,
        "train_s": seconds,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "held_out_logits.npy", logit)
    (run_dir / RESULT_FILE).write_text(json.dumps(row, indent=2))
    print(f"  {name}: AUROC {row['auroc']:.3f}, fit in {seconds:.0f} s")
    return row


def _fit_peer(ctx: Context, samples: Any, spec: Any, image: Any, peer: str, seed: int) -> Any:
    """The boosting peer ``peer`` (a key of ``GBDT_CONFOUNDS``) fit on the training
    cohort's train split, early stopped on tuning (``evaluation.baseline.FittedBaseline``)."""
    from clinfuse.evaluation.baseline import BaselineConfig, fit_baseline

    cfg = BaselineConfig(confounds=GBDT_CONFOUNDS[peer])
    modalities = ("image", "timeseries", "genomics")
    return fit_baseline(ctx.cohorts["train"], samples, spec, modalities, image, cfg, seed=seed)


def _gbdt_image_source(ctx: Context, spec: Any, cfg: RunConfig) -> Any:
    """The frozen image features the gradient-boosting peer reads: the run config's
    backbone settings, cached under the bench's image cache."""
    from clinfuse.evaluation.baseline import ImageFeatureSource

    image_cfg = cfg.model.encoders["timm_image"]
    keep = ("model_name", "weights", "grayscale", "cache_dir")
    settings = {k: image_cfg[k] for k in keep if k in image_cfg}
    return ImageFeatureSource(settings, spec.image_size, ctx.caches / "images")


def samples_and_spec(ctx: Context, variant: Variant) -> tuple[Any, Any, RunConfig]:
    """The training cohort's samples, the DataSpec a run of ``variant`` fits on its train
    split, and the variant's config: what the non-neural rows (gradient boosting, the
    PyPOTS grid) read so they see the same split and the same channels and markers."""
    from clinfuse.datasets.datamodule import fit_spec
    from clinfuse.datasets.samples import load_samples

    cohort = ctx.cohorts["train"]
    cfg = build_config(variant, ctx.base, cohort, ctx.caches)
    samples = load_samples(cohort, cfg.data.split_fractions, cfg.data.split_seed)
    return samples, fit_spec(cohort, samples.filter(_split_filter("train")), cfg.data), cfg


def paired_rows(
    ctx: Context, seeds: tuple[int, ...], extra: tuple[tuple[str, str], ...] = ()
) -> list[dict[str, Any]]:
    """AUROC(a) - AUROC(b) on the held-out subjects with a paired bootstrap 95% CI, per seed.

    ``extra`` pairs (e.g. candidate rows) come after ``PAIRS``; a pair whose runs are
    not all there is left out.
    """
    from clinfuse.evaluation.metrics import paired_auroc_delta

    rows, logits = [], {}  # a run in several pairs is scored once
    for seed in seeds:
        for a, b in PAIRS + extra:
            runs = [r if seed == 0 else f"{r}_seed{seed}" for r in (a, b)]
            if not all((ctx.out / "runs" / r / RESULT_FILE).is_file() for r in runs):
                continue
            for r in runs:
                if r not in logits:
                    logits[r] = _held_out_logits(ctx, r)
            (la, y), (lb, _) = (logits[r] for r in runs)
            d = paired_auroc_delta(y, la, lb, ctx.n_bootstrap)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "seed": seed,
                    "delta": d["delta"],
                    "ci_low": d["ci"][0],
                    "ci_high": d["ci"][1],
                }
            )
    return rows


def _held_out_logits(ctx: Context, run: str) -> tuple[Any, Any]:
    """A row's held-out logits and labels (N,), (N,), in load_samples order."""
    import numpy as np

    path = ctx.out / "runs" / run / "held_out_logits.npy"
    if path.is_file():
        _, y = _labels(ctx, "held_out")
        return np.load(path), y
    x, y = _logit_matrix(ctx, [run], "held_out")
    return x[:, 0], y


def _labels(ctx: Context, split: str) -> tuple[Any, Any]:
    import numpy as np

    from clinfuse.datasets.samples import load_samples

    samples = load_samples(ctx.cohorts["train"]).filter(_split_filter(split))
    return samples, np.asarray(samples["label"].cast(int).to_numpy())


def _token_variant(base: dict[str, Any], adversary: bool, suffix: str) -> Variant:
    """The preset's attention row with the sequence-token path flipped (on <-> off).

    Shows what the time-step and image-patch tokens add (or cost) next to the
    preset's choice.
    """
    uses = bool(base["model"]["fusion"].get("cfg", {}).get("use_tokens", True))
    name = "fusion_attention_pooled" if uses else "fusion_attention_tokens"
    return Variant(f"{name}{suffix}", adversary=adversary, fusion_cfg=(("use_tokens", not uses),))


def stacked_singles(
    ctx: Context, names: list[str], ceiling: float, seed: int = 0, name: str = "stacked_singles"
) -> dict[str, Any]:
    """A logistic regression on the single-modality models' logits (fit on tuning).

    The additive late-fusion baseline built from separately trained encoders:
    ``logit = b + sum_m w_m logit_m``, weights fit on the tuning split, scored on
    held_out. The row and its held-out logits are kept in ``runs/<name>[_seedN]`` so
    the paired comparisons can read it like any other row.
    """
    from sklearn.linear_model import LogisticRegression

    x_tune, y_tune = _logit_matrix(ctx, names, "tuning")
    x_held, y_held = _logit_matrix(ctx, names, "held_out")
    p = LogisticRegression().fit(x_tune, y_tune).decision_function(x_held)  # (N,)
    oracle = _oracle_auroc(ctx.out / "runs" / names[0])
    # The rows stacked are kept in the row: ``stacked_candidates`` is rewritten by every
    # invocation with ``--stack``, whatever it names.
    return _stack_row(
        ctx, name, seed, "logistic stack", y_held, p, oracle, ceiling, stacked=list(names)
    )


def _stack_row(
    ctx: Context,
    name: str,
    seed: int,
    fusion: str,
    y: Any,
    logit: Any,
    oracle: float,
    ceiling: float,
    **extra: Any,
) -> dict[str, Any]:
    """A stack's row from its held-out logits, written with them to ``runs/<name>[_seedN]``
    so the paired comparisons read it like any trained row."""
    import numpy as np

    from clinfuse.evaluation.metrics import auroc, bootstrap_ci

    low, high = bootstrap_ci(auroc, y, logit, ctx.n_bootstrap)
    row = {
        "model": name,
        "seed": seed,
        "modalities": "+".join(ALL_MODALITIES),
        "fusion": fusion,
        "n_held_out": int(y.size),
        "auroc": auroc(y, logit),
        "ci_low": low,
        "ci_high": high,
        "oracle_auroc": oracle,
        "ratio": auroc(y, logit) / oracle,
        "ceiling_auroc": ceiling,
        "epochs": 0,
        "train_s": 0.0,
        **extra,
    }
    run_dir = ctx.out / "runs" / replace(Variant(name), seed=seed).run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "held_out_logits.npy", logit)
    (run_dir / RESULT_FILE).write_text(json.dumps(row, indent=2))
    return row


def stacked_with_gbdt(
    ctx: Context, name: str, seed: int, ceiling: float, peer_name: str = GBDT_MATCHED
) -> dict[str, Any]:
    """A trained row (``name``: the preset or a candidate) stacked with the boosting peer
    given the same confound treatment (``gbdt_confound_matched``).

    ``logit = b + w_1 logit_model + w_2 logit_boosting``, the three fit by a logistic
    regression on the tuning split (where both were early stopped), scored on held_out.
    Neither part reads a site or ancestry column at prediction (the model's offsets are
    left out of it, the peer averages over the training (site, ancestry) pairs), so the
    stack does not either; the shift tests measure whether it still leans on them.
    Row ``stacked_gbdt_<name>[_seedN]`` (``peer_name`` ``gbdt_confound_offsets``, the
    peer without ComBat: ``stacked_gbdt_offsets_<name>``), kept like any other for the
    paired comparisons; the weights are in the row.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from clinfuse.evaluation.metrics import auroc

    run = replace(Variant(name), seed=seed).run_name
    out_name = f"{STACK_PREFIX[peer_name]}{name}"
    out_dir = ctx.out / "runs" / replace(Variant(out_name), seed=seed).run_name
    if (out_dir / RESULT_FILE).is_file():
        return json.loads((out_dir / RESULT_FILE).read_text())
    if not (ctx.out / "runs" / run / RESULT_FILE).is_file():
        raise SystemExit(f"--stack-gbdt {name}: no run {run} yet (add it to --only)")
    samples, spec, cfg = samples_and_spec(ctx, Variant("fusion_early"))
    image = _gbdt_image_source(ctx, spec, cfg)
    cohort = ctx.cohorts["train"]
    peer = _fit_peer(ctx, samples, spec, image, peer_name, seed)
    parts = {}
    for split in ("tuning", "held_out"):
        rows = samples.filter(_split_filter(split))
        x = np.column_stack([_run_logits(ctx, run, cohort, rows), peer.logit(cohort, rows)])
        parts[split] = (x, rows["label"].cast(int).to_numpy())
    stacker = LogisticRegression().fit(*parts["tuning"])
    x_held, y_held = parts["held_out"]
    p = stacker.decision_function(x_held)  # (N,)
    oracle = _oracle_auroc(ctx.out / "runs" / run)
    fusion = f"logistic stack of {name} and {peer_name}"
    row = _stack_row(ctx, out_name, seed, fusion, y_held, p, oracle, ceiling,
                     weights=[float(w) for w in stacker.coef_[0]],
                     peer_auroc=auroc(y_held, x_held[:, 1]))  # fmt: skip
    print(f"  {out_dir.name}: AUROC {row['auroc']:.3f}, weights {np.round(stacker.coef_[0], 2)}")
    return row


def _logit_matrix(ctx: Context, names: list[str], split: str) -> tuple[Any, Any]:
    """Stacked logits of the runs ``names`` on one split of the training cohort.

    Shapes:
        returns: x (N, len(names)), y (N,)
    """
    import numpy as np

    from clinfuse.datasets.samples import load_samples

    cohort = ctx.cohorts["train"]
    samples = load_samples(cohort).filter(_split_filter(split))
    columns = [_run_logits(ctx, name, cohort, samples) for name in names]
    return np.column_stack(columns), samples["label"].cast(int).to_numpy()


def _split_filter(split: str) -> Any:
    """The polars filter of one split."""
    import polars as pl

    return pl.col("split") == split


def _oracle_auroc(run_dir: Path) -> float:
    metrics = json.loads((run_dir / RESULT_FILE).read_text())["metrics"]
    return float(metrics.get("oracle_auroc", float("nan")))


def _ceiling_scores(cohort: Path) -> Any:
    """Held-out scores of logistic regressions fit on the train split's true latents."""
    import polars as pl

    from clinfuse.datasets.schema import ORACLE_FILE, SUBJECT_SPLITS, table_paths
    from clinfuse.simulation.oracle import split_ceiling_scores

    oracle = pl.read_parquet(cohort / ORACLE_FILE)
    return split_ceiling_scores(oracle, pl.read_parquet(table_paths(cohort, SUBJECT_SPLITS)))


def _ceilings(scores: Any) -> dict[str, float]:
    """Held-out AUROC of every latent-factor feature set (``simulation.oracle.FEATURE_SETS``)."""
    from clinfuse.evaluation.metrics import auroc
    from clinfuse.simulation.oracle import FEATURE_SETS

    y = scores["outcome"].to_numpy().astype(int)
    return {name: auroc(y, scores[name].to_numpy()) for name in FEATURE_SETS}


def ceiling_rows(scores: Any, n_bootstrap: int) -> list[dict[str, Any]]:
    """Table rows of the latent-factor ceilings on the held-out subjects.

    Logistic regressions fit on the train split's true latent factors (what a
    perfect encoder of every modality could pass to a linear head), scored on the
    held-out subjects with the same bootstrap CI as the models: ``additive``
    (lung, physio, genetic score, carrier), ``interaction`` (+ physio x carrier)
    and ``interaction_site`` (+ site one-hot, which the adversary removes).
    """
    from clinfuse.evaluation.metrics import auroc, bootstrap_ci

    y = scores["outcome"].to_numpy().astype(int)
    oracle = auroc(y, scores["true_risk"].to_numpy())
    rows = []
    for label, name in CEILING_ROWS.items():
        p = scores[name].to_numpy()  # (N,)
        low, high = bootstrap_ci(auroc, y, p, n_bootstrap)
        value = auroc(y, p)
        rows.append(
            {
                "model": f"ceiling_{label}",
                "seed": "-",
                "modalities": "true latents: " + "+".join(FEATURE_LABELS[name]),
                "fusion": "logistic (train split)",
                "n_held_out": int(y.size),
                "auroc": value,
                "ci_low": low,
                "ci_high": high,
                "oracle_auroc": oracle,
                "ratio": value / oracle,
                "ceiling_auroc": value,
                "epochs": 0,
                "train_s": 0.0,
            }
        )
    return rows


def _strategy_row(
    variant: Variant, result: dict[str, Any], ceilings: dict[str, float]
) -> dict[str, Any]:
    m = result["metrics"]
    modalities, fusion = _trained_modalities(variant, result)
    ceiling = CEILING_SET[modalities[0]] if len(modalities) == 1 else "fused_interaction"
    low, high = m.get("auroc_ci", [float("nan")] * 2)
    oracle = m.get("oracle_auroc", float("nan"))
    return {
        "model": variant.name,
        "seed": variant.seed,
        "modalities": "+".join(modalities),
        "fusion": fusion,
        "n_held_out": m["n"],
        "auroc": m["auroc"],
        "ci_low": low,
        "ci_high": high,
        "oracle_auroc": oracle,
        "ratio": m["auroc"] / oracle,
        "ceiling_auroc": ceilings[ceiling],
        "epochs": result["epochs"],
        "train_s": result["train_s"],
    }


def _trained_modalities(variant: Variant, result: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """The modalities and fusion a run was trained with, read from its stored config
    (a candidate row's edits can remove encoders or change the fusion)."""
    model = result.get("config", {}).get("model", {})
    encoders = model.get("encoders") or {}
    if not encoders:
        return variant.modalities, variant.fusion
    kept = tuple(m for m in ALL_MODALITIES if encoders.get(MODALITY_ENCODER[m]) is not None)
    return kept or variant.modalities, model.get("fusion", {}).get("name", variant.fusion)


def confound(ctx: Context, seeds: tuple[int, ...] = (0,)) -> list[dict[str, Any]]:
    """Attention fusion with and without the adversary: held-out vs confound-flip AUROC."""
    rows = []
    for seed in seeds:
        for adversary in (True, False):
            name = "fusion_attention" if adversary else "fusion_attention_no_adv"
            variant = Variant(name, adversary=adversary, seed=seed)
            result = ctx.run(variant)
            flip = _evaluate_flip(ctx, variant.run_name)
            rows.append(_confound_row(adversary, seed, result, flip))
    return rows


def _evaluate_flip(ctx: Context, name: str) -> dict[str, Any]:
    run_dir = ctx.out / "runs" / name
    out = run_dir / "evaluation_flip"
    path = out / "metrics.json"
    if path.is_file() and path.stat().st_mtime >= (run_dir / RESULT_FILE).stat().st_mtime:
        return json.loads(path.read_text())
    return evaluate(run_dir, ctx.cohorts["flip"], out, "all", ctx.n_bootstrap, gradcam_images=0)


def _confound_row(
    adversary: bool, seed: int, result: dict[str, Any], flip: dict[str, Any]
) -> dict[str, Any]:
    held = result["metrics"]
    audit = held["audit"]
    return {
        "model": "fusion_attention" if adversary else "fusion_attention_no_adv",
        "adversary": adversary,
        "seed": seed,
        "auroc_held_out": held["auroc"],
        "oracle_held_out": held.get("oracle_auroc", float("nan")),
        "auroc_flip": flip["auroc"],
        "flip_ci": flip.get("auroc_ci"),
        "oracle_flip": flip.get("oracle_auroc", float("nan")),
        "drop": held["auroc"] - flip["auroc"],
        "site_probe": audit["site"]["probe_accuracy"],
        "site_mlp_probe": audit["site"].get("mlp_probe_accuracy", float("nan")),
        "site_majority": audit["site"]["majority_rate"],
        "ancestry_probe": audit["ancestry"]["probe_accuracy"],
        "ancestry_mlp_probe": audit["ancestry"].get("mlp_probe_accuracy", float("nan")),
        "ancestry_majority": audit["ancestry"]["majority_rate"],
        "flip_per_site_auroc": {k: v["auroc"] for k, v in flip["per_site"].items()},
    }


def shift(
    ctx: Context, subjects: int, seeds: tuple[int, ...], only: list[str] | None = None
) -> list[dict[str, Any]]:
    """Shift tests: does the model lean on site or ancestry when their link to the outcome
    changes, or at a site it never saw?

    Training cohort: site and ancestry both linked to the outcome (``site_effect`` and
    ``ancestry_effect`` normal). Test cohorts of the same world (other subjects): the
    ancestry link reversed, the site link reversed, and both links kept but with the
    world's held-back site added. The reference is the confound-free model: the preset
    the treatments edit (``SHIFT_BASE``) trained on a cohort of the same size and
    subjects drawn with both links ``none`` (it cannot learn either shortcut), scored on
    the same test cohorts: removing a shortcut must cost what the shortcut gave
    in-distribution, no more. The row ``preset`` is the user preset as it ships.

    For the unseen site the comparison is within sites, on the same test cohort: the
    model's AUROC among the new site's subjects against its mean AUROC within each of
    the sites it trained on (a site's own offset cannot help inside one site, so the
    two are comparable).
    """
    size = ctx.film_side
    flip = max(subjects // 2, 200)

    def cohort(name: str, n: int, seed: int, **kwargs: Any) -> Path:
        cfg = SimConfig(n_subjects=n, image_size=size, seed=seed, progress=False, **kwargs)
        return _simulate_once(ctx.out / "cohorts" / f"shift_n{n}_{name}", cfg)

    both = {"site_effect": "normal", "ancestry_effect": "normal"}
    train = cohort("linked", subjects, 0, **both)
    tests = {
        "ancestry": cohort("ancestry_reversed", flip, 1, **{**both, "ancestry_effect": "reversed"}),
        "site": cohort("site_reversed", flip, 1, **{**both, "site_effect": "reversed"}),
        NEW_SITE: cohort("new_site", flip, 1, **both, new_site=True),
    }
    free = cohort("none", subjects, 0, site_effect="none", ancestry_effect="none")
    out = ctx.out / "shift"
    linked = ctx.within({"train": train}, out / "linked")
    reference_ctx = ctx.within({"train": free}, out / "reference")
    rows = []
    for seed in seeds:
        ref = Variant("preset", preset=str(SHIFT_BASE), seed=seed)
        ref_held = reference_ctx.run(ref)["metrics"]
        # The reference on the linked cohort's held-out patients, the treated models' own
        # held-out split: what a model without either shortcut reaches where they hold.
        linked_held = _shift_auroc(reference_ctx, ref.run_name, train, "linked", "held_out")
        ref_held = {**ref_held, "auroc_linked": linked_held["auroc"]}
        reference = {
            link: _shift_scores(reference_ctx, ref.run_name, test, link, ref_held)
            for link, test in tests.items()
        }
        for name, (preset, edits) in _shift_rows(ctx).items():
            if only is not None and name not in only:
                continue
            v = Variant(name, preset=str(preset), overrides=edits, seed=seed)
            held = linked.run(v)["metrics"]
            held = {**held, "genetic_signal": _genetic_signal(linked, v.run_name, train, held)}
            for link, test in tests.items():
                scores = _shift_scores(linked, v.run_name, test, link, held)
                rows.append(_shift_row(name, seed, link, held, scores, reference[link], ref_held))
        peers = {p: _gbdt_shift(linked, seed, tests, p) for p in GBDT_CONFOUNDS
                 if only is None or p in only}  # fmt: skip
        for peer_name, prefix in STACK_PREFIX.items():  # the shipped model + a site-blind peer
            if only is not None and f"{prefix}preset" in only:
                preset = replace(Variant("preset"), seed=seed).run_name
                peers[f"{prefix}preset"] = _stack_shift(linked, seed, tests, preset, peer_name)
        for name, peer in peers.items():
            for link, scores in peer["scores"].items():
                rows.append(
                    _gbdt_shift_row(seed, link, peer, scores, reference[link], ref_held, name)
                )
    return rows


def _shift_rows(ctx: Context) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Row name -> (preset, edits): the user preset as it ships, then the treatments."""
    rows = {"preset": (ctx.user_preset, ())}
    rows.update({name: (SHIFT_BASE, edits) for name, edits in SHIFT_TREATMENTS.items()})
    return rows


def _gbdt_shift(
    ctx: Context, seed: int, tests: dict[str, Path], peer: str = "gbdt_features"
) -> dict[str, Any]:
    """The HAIM-style peer through the shift tests: gradient boosting on fixed features
    fit on the linked cohort's train split (as ``gbdt_features``; ``peer``
    ``gbdt_confound_matched`` with the default's confound treatment), scored on its
    held-out split and on each test cohort like the trained rows (``_shift_scores``).
    Cached beside the other runs as ``runs/<peer>[_seed<k>]/shift.json``."""

    def fit(samples: Any, spec: Any, image: Any) -> tuple[Any, int]:
        fitted = _fit_peer(ctx, samples, spec, image, peer, seed)
        return fitted.logit, fitted.n_iter

    return _peer_shift(ctx, seed, tests, peer, fit)


def _stack_shift(
    ctx: Context, seed: int, tests: dict[str, Path], run: str, peer_name: str = GBDT_MATCHED
) -> dict[str, Any]:
    """``stacked_with_gbdt`` through the shift tests: the trained run ``run`` and the
    site-blind peer ``peer_name``, both fit on the linked cohort, stacked by a logistic
    regression on its tuning split, scored like the peer (``_gbdt_shift``). Row
    ``<STACK_PREFIX[peer_name]><run without its seed suffix>``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    base = run.split("_seed")[0]

    def fit(samples: Any, spec: Any, image: Any) -> tuple[Any, int]:
        train = ctx.cohorts["train"]
        peer = _fit_peer(ctx, samples, spec, image, peer_name, seed)

        def parts(cohort: Path, rows: Any) -> Any:
            return np.column_stack([_run_logits(ctx, run, cohort, rows), peer.logit(cohort, rows)])

        tuning = samples.filter(_split_filter("tuning"))
        stacker = LogisticRegression().fit(parts(train, tuning), tuning["label"].cast(int))
        return (lambda cohort, rows: stacker.decision_function(parts(cohort, rows))), peer.n_iter

    return _peer_shift(ctx, seed, tests, f"{STACK_PREFIX[peer_name]}{base}", fit)


def _run_logits(ctx: Context, run: str, cohort: Path, rows: Any) -> Any:
    """A trained run's logits on ``rows`` of ``cohort``, in their order (N,)."""
    import numpy as np
    import torch

    from clinfuse.datasets.datamodule import config_from_dict, make_loader
    from clinfuse.training.predict import collect_predictions

    art = load_artifact(ctx.out / "runs" / run / "model")
    loader = make_loader(cohort, rows, art.spec, config_from_dict(art.data_config))
    with torch.no_grad():
        pred = collect_predictions(art.model, loader)
    if not np.array_equal(
        np.asarray(pred["label"]).astype(int), rows["label"].cast(int).to_numpy()
    ):
        raise RuntimeError(f"{run}: predictions on {cohort} are not in the samples' order")
    return np.asarray(pred["logit"])


def _peer_shift(
    ctx: Context, seed: int, tests: dict[str, Path], name: str, fit: Any
) -> dict[str, Any]:
    """A model fit outside ``training.run`` through the shift tests. ``fit(samples, spec,
    image)`` fits it on the linked cohort and returns ``(logit(cohort, rows), n_iter)``.
    Cached as ``runs/<name>[_seed<k>]/shift.json``."""
    import numpy as np
    import polars as pl

    from clinfuse.datasets.samples import load_samples
    from clinfuse.evaluation.metrics import auroc

    run_name = name if seed == 0 else f"{name}_seed{seed}"
    path = ctx.out / "runs" / run_name / "shift.json"
    if path.is_file():
        return json.loads(path.read_text())
    train = ctx.cohorts["train"]
    samples, spec, cfg = samples_and_spec(ctx, Variant("fusion_early"))
    image = _gbdt_image_source(ctx, spec, cfg)
    logit_of, n_iter = fit(samples, spec, image)

    def score(cohort: Path, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return rows["label"].cast(int).to_numpy(), logit_of(cohort, rows)

    held = samples.filter(_split_filter("held_out"))
    y, logit = score(train, held)
    trained_sites = set(samples.filter(_split_filter("train"))["site"].unique().to_list())
    result: dict[str, Any] = {"auroc": auroc(y, logit), "n_iter": n_iter, "scores": {}}
    for link, cohort in tests.items():
        rows = load_samples(cohort)
        y_t, logit_t = score(cohort, rows)
        if link != NEW_SITE:
            result["scores"][link] = {"before": result["auroc"], "after": auroc(y_t, logit_t)}
            continue
        site = rows["site"].to_numpy()
        per_site = {s: auroc(y_t[site == s], logit_t[site == s]) for s in sorted(set(site))}
        result["scores"][link] = _new_site_scores(cohort, per_site, trained_sites)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _gbdt_shift_row(
    seed: int,
    link: str,
    peer: dict[str, Any],
    scores: dict[str, float],
    reference: dict[str, float],
    reference_held: dict,
    name: str = "gbdt_features",
) -> dict[str, Any]:
    """A ``_shift_row`` for a model without a fused representation to audit (the boosting
    peers, the stack)."""
    audit = {k: {"probe_accuracy": float("nan")} for k in ("site", "ancestry")}
    held = {"auroc": peer["auroc"], "audit": audit, "genetic_signal": {}}
    return _shift_row(name, seed, link, held, scores, reference, reference_held)


# The shift experiment's unseen-site test (the world's held-back site added).
NEW_SITE = "new_site"


def _shift_scores(
    ctx: Context, run: str, cohort: Path, link: str, held: dict[str, Any]
) -> dict[str, float]:
    """A run's AUROC before and after one shift: ``{"before", "after"}``.

    A reversed link: the run's held-out AUROC, then its AUROC on every subject of the
    reversed cohort. The unseen site: the mean within-site AUROC over the sites the run
    trained on, then the AUROC among the new site's subjects, both on the new-site cohort.
    """
    metrics = _shift_auroc(ctx, run, cohort, link)
    if link != NEW_SITE:
        return {"before": held["auroc"], "after": metrics["auroc"]}
    per_site = {s: m["auroc"] for s, m in metrics["per_site"].items()}
    return _new_site_scores(cohort, per_site, set(held["per_site"]))


def _new_site_scores(cohort: Path, per_site: dict[str, float], seen: set[str]) -> dict[str, float]:
    """The unseen-site shift from per-site AUROCs on the new-site cohort: the mean over
    the sites in ``seen`` (those trained on), then the one site not among them."""
    new = [s for s in per_site if s not in seen]
    if len(new) != 1:
        raise ValueError(f"{cohort}: expected one site not in training, found {new}")
    before = statistics.fmean(per_site[s] for s in per_site if s in seen)
    return {"before": before, "after": per_site[new[0]]}


def _genetic_signal(ctx: Context, run: str, cohort: Path, held: dict[str, Any]) -> dict[str, Any]:
    """The run's ``audit.genetic_signal`` on the held-out split (computed and cached
    beside the run when its evaluation predates it)."""
    if "genetic_signal" in held.get("audit", {}):
        return held["audit"]["genetic_signal"]
    run_dir = ctx.out / "runs" / run

    def compute() -> dict[str, Any]:
        art = load_artifact(run_dir / "model")
        return run_genetic_signal(art, cohort, run_dir / "image_cache") or {}

    return _beside_run(run_dir, run_dir / "genetic_signal.json", compute)


def _shift_auroc(
    ctx: Context, run: str, cohort: Path, link: str, split: str = "all"
) -> dict[str, Any]:
    """Metrics of a run on a shifted cohort (every subject of ``split``), cached beside
    the run. AUROC only (no audit): the audit is read from the held-out evaluation."""
    run_dir = ctx.out / "runs" / run

    def compute() -> dict[str, Any]:
        art = load_artifact(run_dir / "model")
        return discrimination(art, cohort, run_dir / "image_cache", split, ctx.n_bootstrap)[0]

    return _beside_run(run_dir, run_dir / f"evaluation_shift_{link}" / "metrics.json", compute)


def _beside_run(run_dir: Path, path: Path, compute: Any) -> dict[str, Any]:
    """``path``'s JSON when it is newer than the run's result, else ``compute()`` written there."""
    if path.is_file() and path.stat().st_mtime >= (run_dir / RESULT_FILE).stat().st_mtime:
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _shift_row(
    name: str,
    seed: int,
    link: str,
    held: dict,
    scores: dict[str, float],
    reference: dict[str, float],
    reference_held: dict,
) -> dict[str, Any]:
    audit = held["audit"]
    genotype_ancestry = audit["ancestry"].get("by_modality", {}).get("genomics", {})
    return {
        "model": name,
        "seed": seed,
        "shift": "unseen site" if link == NEW_SITE else f"{link} link reversed",
        "auroc_held_out": held["auroc"],
        "auroc_before": scores["before"],
        "auroc_shifted": scores["after"],
        "drop": scores["before"] - scores["after"],
        "reference_held_out": reference_held["auroc"],
        "reference_linked_held_out": reference_held["auroc_linked"],
        "vs_reference_held_out": held["auroc"] - reference_held["auroc_linked"],
        "reference_drop": reference["before"] - reference["after"],
        # Like for like with ``drop`` for the reversed links: the reference from the
        # linked cohort's held-out split to the reversed cohort.
        "reference_linked_drop": (
            reference_held["auroc_linked"] - reference["after"]
            if link != NEW_SITE
            else reference["before"] - reference["after"]
        ),
        "reference_shifted": reference["after"],
        "vs_reference": scores["after"] - reference["after"],
        "site_probe": audit["site"]["probe_accuracy"],
        "site_gbt_probe": audit["site"].get("gbt_probe_accuracy", float("nan")),
        "ancestry_probe": audit["ancestry"]["probe_accuracy"],
        "ancestry_gbt_probe": audit["ancestry"].get("gbt_probe_accuracy", float("nan")),
        "ancestry_genotype_probe": genotype_ancestry.get("probe_accuracy", float("nan")),
        "carrier_auroc": held["genetic_signal"].get("carrier_auroc", float("nan")),
        "genetic_score_r2": held["genetic_signal"].get("genetic_score_r2", float("nan")),
    }


def missing(
    ctx: Context,
    subjects: int,
    mode: str,
    adversary: bool,
    seeds: tuple[int, ...],
    only: list[str] | None = None,
    site_effect: str = "normal",
    candidates: dict[str, list[str]] | None = None,
    cohorts: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every fusion strategy, the preset and ``gbdt_features`` with a modality missing.

    One cohort per ``MISSING_GRID`` entry (same subjects and world, missing in training
    and at test alike), each row's drop measured from its own complete-data run of the
    same seed. Film missingness is ``mode`` (informative: sicker patients are filmed
    more often); genotype missingness is at random (most ICU patients are never typed).
    ``site_effect`` is the cohorts' link between site and outcome (as ``make_cohorts``).
    ``candidates`` (name -> ``key=value`` edits of the user preset) add rows
    ``candidate_<name>``, as in the strategies table; ``cohorts`` keeps only the grid
    entries named ``modality:share`` (``none:0``, ``genotypes:0.9``, ...; None = all).
    A row's drop needs its complete-data run (``none:0``) in the same invocation.
    """
    suffix = "" if adversary else "_no_adv"
    rows: list[dict[str, Any]] = []
    complete: dict[tuple[str, int], float] = {}
    names = [r for r in MISSING_ROWS if only is None or r in only]
    extra = {
        f"candidate_{c}": e
        for c, e in (candidates or {}).items()
        if only is None or f"candidate_{c}" in only
    }
    grid = [
        (m, share) for m, share in MISSING_GRID if cohorts is None or f"{m}:{share:g}" in cohorts
    ]
    unknown = sorted(set(cohorts or ()) - {f"{m}:{share:g}" for m, share in MISSING_GRID})
    if unknown:
        raise SystemExit(
            f"--missing-cohorts: unknown {unknown}; known: "
            + ", ".join(f"{m}:{share:g}" for m, share in MISSING_GRID)
        )
    for modality, share in grid:
        sub = _missing_context(ctx, subjects, modality, share, mode, site_effect)
        for seed in seeds:
            variants = [
                _missing_variant(n, suffix, adversary, ctx.user_preset, seed) for n in names
            ]
            variants += [
                Variant(n, preset=str(ctx.user_preset), overrides=tuple(e), seed=seed)
                for n, e in extra.items()
            ]
            for v in variants:
                auc = sub.run(v)["metrics"]["auroc"]
                rows.append(_missing_row(v.name, seed, modality, share, auc, complete))
            for peer in GBDT_CONFOUNDS:
                if only is not None and peer not in only:
                    continue
                base = gbdt_features(sub, seed, float("nan"), peer)
                rows.append(_missing_row(peer, seed, modality, share, base["auroc"], complete))
            for peer_name, prefix in STACK_PREFIX.items():  # the preset + a site-blind peer
                if only is not None and f"{prefix}preset" in only:
                    auc = stacked_with_gbdt(sub, "preset", seed, float("nan"), peer_name)["auroc"]
                    rows.append(
                        _missing_row(f"{prefix}preset", seed, modality, share, auc, complete)
                    )
        ceiling = observed_ceiling(sub.cohorts["train"])
        rows.append(_missing_row("ceiling_observed", 0, modality, share, ceiling, complete))
    return rows


def observed_ceiling(cohort: Path) -> float:
    """Held-out AUROC of the interaction ceiling on the data each subject has.

    ``simulation.oracle.observed_ceiling_scores`` with presence read from the cohort's
    own tables: a subject is filmed when it has a film at or before its prediction
    time, genotyped when it has a genotypes row. The ceiling's drop from the complete
    cohort is what the missing data costs any model, the yardstick of each row's drop.
    """
    import polars as pl

    from clinfuse.datasets.schema import (
        GENOTYPES,
        IMAGES,
        LABELS,
        ORACLE_FILE,
        SUBJECT_SPLITS,
        table_paths,
    )
    from clinfuse.evaluation.metrics import auroc
    from clinfuse.simulation.oracle import observed_ceiling_scores

    def read(spec: Any, columns: list[str]) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(p, columns=columns) for p in table_paths(cohort, spec)])

    oracle = pl.read_parquet(cohort / ORACLE_FILE)
    labels = read(LABELS, ["subject_id", "prediction_time"])
    films = read(IMAGES, ["subject_id", "time"])
    filmed = (
        films.join(labels, on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))["subject_id"]
        .unique()
    )
    typed = read(GENOTYPES, ["subject_id"])["subject_id"]
    ids = oracle["subject_id"]
    present = {"image": ids.is_in(filmed).to_numpy(), "genomics": ids.is_in(typed).to_numpy()}
    splits = read(SUBJECT_SPLITS, ["subject_id", "split"])
    scores = observed_ceiling_scores(oracle, splits, present)
    return auroc(
        scores["outcome"].to_numpy().astype(int), scores["observed_interaction"].to_numpy()
    )


def _missing_context(
    ctx: Context, subjects: int, modality: str, share: float, mode: str, site_effect: str
) -> Context:
    """A context whose training cohort misses ``modality`` for a share of subjects."""
    image = share if modality == "image" else 0.0
    geno = share if modality == "genotypes" else 0.0
    kind = (
        "complete"
        if modality == "none"
        else f"{modality}_{mode if modality == 'image' else 'random'}_{share:g}"
    )
    name = kind + _draw_suffix(ctx.cohort_seed) + _site_suffix(site_effect)
    cfg = SimConfig(
        n_subjects=subjects,
        image_size=ctx.film_side,
        seed=ctx.cohort_seed,
        image_missing=image,
        image_missing_mode=mode,
        genotype_missing=geno,
        site_effect=site_effect,
        progress=False,
    )
    cohort = _simulate_once(ctx.out / "cohorts" / f"missing_n{subjects}_{name}", cfg)
    out = ctx.out / "missing" / name
    return ctx.within({"train": cohort}, out)


def _missing_variant(name: str, suffix: str, adversary: bool, preset: Path, seed: int) -> Variant:
    if name == "preset":
        return Variant("preset", preset=str(preset), seed=seed)
    fusion = name.removeprefix("fusion_")
    return Variant(f"{name}{suffix}", fusion=fusion, adversary=adversary, seed=seed)


def _missing_row(
    name: str, seed: int, modality: str, share: float, auc: float, complete: dict
) -> dict[str, Any]:
    if modality == "none":
        complete[(name, seed)] = auc
    reference = complete.get((name, seed), float("nan"))
    return {
        "model": name,
        "seed": seed,
        "missing": modality,
        "share": share,
        "auroc": auc,
        "complete_auroc": reference,
        "drop": reference - auc,
    }


def transfer(
    ctx: Context,
    fractions: list[float],
    adversary: bool = True,
    modes: tuple[str, ...] = DEFAULT_TRANSFER_ROWS,
    seeds: tuple[int, ...] = (0,),
) -> list[dict[str, Any]]:
    """Image-only: pretrained vs scratch fine-tuning, frozen pretrained as the baseline.

    ``modes`` are keys of ``TRANSFER_ROWS`` (how the backbone trains, from which
    weights); every mode is trained at every label fraction, once per seed.
    """
    suffix = "" if adversary else "_no_adv"
    rows = []
    for seed in seeds:
        for fraction in fractions:
            for label in modes:
                mode, weights, image_cfg = TRANSFER_ROWS[label]
                name = f"image_{label}_f{int(round(fraction * 100))}{suffix}"
                v = Variant(
                    name,
                    ("image",),
                    "early",
                    adversary,
                    mode,
                    weights,
                    fraction,
                    image_cfg=tuple(image_cfg.items()),
                    seed=seed,
                )
                rows.append(_transfer_row(label, fraction, seed, ctx.run(v)))
    return rows


def _transfer_row(label: str, fraction: float, seed: int, result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    low, high = m.get("auroc_ci", [float("nan")] * 2)
    return {
        "model": label,
        "seed": seed,
        "label_fraction": fraction,
        "auroc": m["auroc"],
        "ci_low": low,
        "ci_high": high,
        "oracle_auroc": m.get("oracle_auroc", float("nan")),
        "epochs": result["epochs"],
        "train_s": result["train_s"],
    }


# ------------------------------------------------------------------ output


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (floats to 3 decimals, seconds to 0)."""
    if not rows:
        return "(no rows)\n"
    cols = [c for c in rows[0] if not isinstance(rows[0][c], dict)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if column.endswith("_s") else f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    return str(value)


def seed_summary(
    rows: list[dict[str, Any]], keys: tuple[str, ...], values: tuple[str, ...]
) -> list[dict[str, Any]]:
    """One row per ``keys`` group of ``rows``: mean, s.d., min and max of each of ``values``.

    The s.d. is across training seeds (n - 1 in the denominator; 0 for one seed): how
    much a row moves when only the initialization, dropout and batch order change.
    NaN values (a drop without its complete-data run) are left out; a value that is NaN
    for every seed gives NaN statistics.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for group, members in groups.items():
        summary: dict[str, Any] = dict(zip(keys, group, strict=True))
        summary["seeds"] = len(members)
        for v in values:
            xs = [x for x in (float(m[v]) for m in members) if not math.isnan(x)]
            if not xs:
                for stat in ("mean", "sd", "min", "max"):
                    summary[f"{v}_{stat}"] = float("nan")
                continue
            summary[f"{v}_mean"] = statistics.fmean(xs)
            summary[f"{v}_sd"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
            summary[f"{v}_min"] = min(xs)
            summary[f"{v}_max"] = max(xs)
        out.append(summary)
    return out


def write_outputs(out: Path, name: str, rows: list[dict[str, Any]], notes: str) -> str:
    """Writes ``<name>.json`` and ``<name>.md``; returns the markdown."""
    text = f"## {name}\n\n{notes}\n\n{markdown_table(rows)}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str))
    (out / f"{name}.md").write_text(text)
    return text


def _strategy_notes(rows: list[dict[str, Any]]) -> str:
    """The verdict on the attention row; on the seed means when rows are summaries."""
    attention = next((r for r in rows if r["model"].startswith("fusion_attention")), None)
    if attention is None:
        return "No attention row."
    key = "ratio_mean" if "ratio_mean" in attention else "ratio"
    ratio = attention[key]
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    over = f" (mean of {attention['seeds']} seeds)" if key == "ratio_mean" else ""
    text = (
        f"Attention fusion reaches {ratio:.3f} x oracle AUROC{over} "
        f"({verdict} the {TARGET_RATIO} target by {ratio - TARGET_RATIO:+.3f})."
    )
    ceilings = [r for r in rows if r["model"].startswith("ceiling_")]
    if not ceilings:
        return text
    listed = ", ".join(f"{r['model'].removeprefix('ceiling_')} {r[key]:.3f}x" for r in ceilings)
    return (
        f"{text} Ceilings on the same held-out subjects (logistic regressions fit on the "
        f"train split's true latent factors): {listed}. A model can only beat a ceiling "
        "by chance or by using what the ceiling leaves out; the adversary is meant to "
        "remove the site term."
    )


def _confound_notes(rows: list[dict[str, Any]]) -> str:
    if rows and "drop_mean" in rows[0]:
        parts = [
            f"{r['model']}: mean drop {r['drop_mean']:+.3f} (s.d. {r['drop_sd']:.3f}, "
            f"{r['seeds']} seeds)"
            for r in rows
        ]
    else:
        parts = [f"{r['model']} seed {r['seed']}: drop {r['drop']:+.3f}" for r in rows]
    return "AUROC drop from held-out to the confound-flip cohort: " + "; ".join(parts) + "."


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", choices=[*EXPERIMENTS, "all"], default="all")
    ap.add_argument("--subjects", type=int, default=5000, help="training cohort size")
    ap.add_argument(
        "--flip-subjects", type=int, default=0, help="flip cohort size (0 = subjects / 2)"
    )
    ap.add_argument("--transfer-subjects", type=int, default=0, help="0 = --subjects")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--image-size", type=int, default=64, help="side of the simulated films")
    ap.add_argument(
        "--input-size",
        type=int,
        default=0,
        help="side every model and the boosting peer resize the films to (0 = --image-size; "
        "runs are named as at any size, so give another --out)",
    )
    ap.add_argument(
        "--cohort-seed",
        type=int,
        default=0,
        help="simulator seed that draws the subjects of the strategies, confound, transfer and "
        "missing cohorts from the same world (0 = the cohort every table uses; the flip cohort "
        "takes it + 1); runs are named as for any cohort, so give another --out",
    )
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for CIs")
    ap.add_argument("--config", default=str(BASE_PRESET), help="base preset")
    ap.add_argument(
        "--preset",
        default=str(USER_PRESET),
        help="the user preset of the strategies table's 'preset' row (default configs/demo.yaml)",
    )
    ap.add_argument("--out", default="runs/bench_fusion")
    ap.add_argument(
        "--adversary",
        choices=["on", "off"],
        default="on",
        help="strategies and transfer rows with or without the confound adversary",
    )
    ap.add_argument("--only", nargs="+", default=None, help="strategies rows to run (names)")
    ap.add_argument(
        "--candidates",
        default=None,
        help="YAML mapping name -> list of key=value edits of --preset; each is a row "
        "candidate_<name> of the strategies table",
    )
    ap.add_argument(
        "--stack",
        nargs="+",
        default=(),
        help="candidate names (single-modality edits of --preset) stacked by a logistic "
        "regression into the row stacked_candidates",
    )
    ap.add_argument(
        "--stack-gbdt",
        nargs="+",
        default=(),
        help="rows (preset, candidate_<name>) each stacked with gbdt_confound_matched by a "
        "logistic regression on the tuning split into the row stacked_gbdt_<row>",
    )
    ap.add_argument(
        "--stack-peers",
        nargs="+",
        default=[GBDT_MATCHED],
        choices=list(STACK_PREFIX),
        help="the site-blind peers --stack-gbdt stacks each row with (rows stacked_gbdt_<row> "
        "and stacked_gbdt_offsets_<row>)",
    )
    ap.add_argument(
        "--pairs",
        nargs="+",
        default=(),
        help="extra paired comparisons A:B (row names) of the strategies table",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds; with more than one, <experiment>_seeds.md has mean/s.d./min/max",
    )
    ap.add_argument(
        "--missing-mode",
        choices=["informative", "random"],
        default="informative",
        help="film missingness of the missing experiment (informative: sicker patients "
        "are filmed more often)",
    )
    ap.add_argument(
        "--missing-cohorts",
        nargs="+",
        default=None,
        help="cohorts of the missing experiment to run, as modality:share (none:0, "
        "image:0.25, ..., genotypes:0.9; default: all)",
    )
    ap.add_argument(
        "--site-effect",
        choices=["normal", "none"],
        default="normal",
        help="link between site and outcome in the strategies and missing cohorts "
        "(normal: the simulator's default, a shortcut a model can read; none: no shortcut)",
    )
    ap.add_argument(
        "--transfer-modes",
        nargs="+",
        choices=list(TRANSFER_ROWS),
        default=list(DEFAULT_TRANSFER_ROWS),
        help="rows of the transfer table",
    )
    return ap.parse_args(argv)


def _base_preset(args: argparse.Namespace) -> dict[str, Any]:
    base = load_yaml(args.config)
    base.setdefault("data", {})["image_size"] = args.input_size or args.image_size
    base.setdefault("optim", {}).update(max_epochs=args.epochs, patience=args.patience)
    return base


def _context(args: argparse.Namespace, subjects: int, out: Path) -> Context:
    flip = args.flip_subjects or max(subjects // 2, 200)
    cohorts = make_cohorts(
        out / "cohorts", subjects, flip, args.image_size, args.site_effect, args.cohort_seed
    )
    return Context(
        _base_preset(args),
        cohorts,
        out,
        args.bootstrap,
        Path(args.preset),
        film_size=args.image_size,
        cohort_seed=args.cohort_seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    contexts: dict[int, Context] = {}
    for name in wanted:
        subjects = (
            (args.transfer_subjects or args.subjects) if name == "transfer" else args.subjects
        )
        if subjects not in contexts:
            contexts[subjects] = _context(args, subjects, out)
        print(f"== {name} ({subjects} subjects)", flush=True)
        rows = _run_experiment(name, contexts[subjects], args)
        off = name != "confound" and args.adversary == "off"
        label = f"{name}_no_adv" if off else name
        print(write_outputs(out, label, rows, NOTES[name](rows)), flush=True)
        if len(args.seeds) > 1:
            keys, values = SUMMARY[name]
            summary = seed_summary(rows, keys, values)
            print(write_outputs(out, f"{label}_seeds", summary, NOTES[name](summary)), flush=True)
        if name == "strategies":
            extra = tuple(_pair(p) for p in args.pairs)
            pairs = paired_rows(contexts[subjects], tuple(args.seeds), extra)
            note = "Held-out AUROC(a) - AUROC(b), paired bootstrap 95% CI (same subjects)."
            print(write_outputs(out, f"{label}_paired", pairs, note), flush=True)
    return 0


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise SystemExit(f"--pairs {text!r}: write each pair as A:B (two row names)")
    return a, b


def _run_experiment(name: str, ctx: Context, args: argparse.Namespace) -> list[dict[str, Any]]:
    seeds = tuple(args.seeds)
    candidates = load_yaml(args.candidates) if args.candidates else None
    if name == "strategies":
        stack, stack_gbdt = tuple(args.stack), tuple(args.stack_gbdt)
        return strategies(ctx, args.adversary == "on", args.only, seeds, candidates, stack,
                          stack_gbdt, tuple(args.stack_peers))  # fmt: skip
    if name == "confound":
        return confound(ctx, seeds)
    if name == "shift":
        return shift(ctx, args.subjects, seeds, args.only)
    if name == "missing":
        subjects = args.subjects
        adversary = args.adversary == "on"
        return missing(
            ctx,
            subjects,
            args.missing_mode,
            adversary,
            seeds,
            args.only,
            args.site_effect,
            candidates,
            args.missing_cohorts,
        )
    return transfer(ctx, args.fractions, args.adversary == "on", tuple(args.transfer_modes), seeds)


NOTES = {
    "strategies": _strategy_notes,
    "confound": _confound_notes,
    "transfer": lambda rows: "Image-only models, held-out AUROC.",
    "shift": lambda rows: (
        "Before/after: held-out AUROC and AUROC on a cohort of the same world with one "
        "outcome link reversed; for the unseen site, mean within-site AUROC at the training "
        "sites and AUROC at the new site (same cohort). Reference = the same preset trained "
        "with neither link (confound-free), on the same test cohorts."
    ),
    "missing": lambda rows: (
        "Held-out AUROC with a share of subjects missing a modality (in training and at "
        "test); drop = the same model and seed on the complete cohort minus this row."
    ),
}
# Seed summaries: (grouping columns, summarized columns) per experiment.
SUMMARY = {
    "strategies": (("model", "modalities", "fusion"), ("auroc", "ratio")),
    "confound": (
        ("model",),
        (
            "auroc_held_out",
            "auroc_flip",
            "drop",
            "site_probe",
            "site_mlp_probe",
            "ancestry_probe",
            "ancestry_mlp_probe",
        ),
    ),
    "transfer": (("model", "label_fraction"), ("auroc",)),
    "missing": (("model", "missing", "share"), ("auroc", "drop")),
    "shift": (
        ("model", "shift"),
        (
            "auroc_held_out",
            "auroc_before",
            "auroc_shifted",
            "drop",
            "reference_held_out",
            "reference_linked_held_out",
            "vs_reference_held_out",
            "reference_drop",
            "reference_linked_drop",
            "reference_shifted",
            "vs_reference",
            "site_probe",
            "site_gbt_probe",
            "ancestry_probe",
            "ancestry_gbt_probe",
            "carrier_auroc",
        ),
    ),
}


if __name__ == "__main__":
    raise SystemExit(main())
