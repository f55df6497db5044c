"""The full model: per-modality encoders -> fusion -> risk head, plus the confound adversary.

A plain ``nn.Module``; the training loop (losses, optimizers, schedules) lives in
the LightningModule. Only modalities whose encoder is configured are used, so a
single-modality model is a model with one encoder.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from clinfuse.datasets.batch import MODALITIES
from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import ModalityEncoder, create_encoder
from clinfuse.fusion.adversary import (
    AdversaryConfig,
    ConfoundAdversary,
    build_adversary,
    dann_lambda,
)
from clinfuse.fusion.base import FusionModule, create_fusion
from clinfuse.fusion.erasure import ConceptEraser
from clinfuse.fusion.gene_environment import GENE_INPUT_KEY, GENE_MODALITY, GeneEnvironment
from clinfuse.fusion.offsets import ConfoundOffsets, build_offsets

Embeddings = dict[str, tuple[Tensor, Tensor]]
Tokens = dict[str, tuple[Tensor, Tensor, Tensor]]


@dataclass
class FusionConfig:
    """Which fusion strategy and its keyword arguments (see ``fusion/<name>.py``)."""

    name: str = "attention"
    cfg: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The whole model.

    Attributes:
        encoders: registered encoder name -> its keyword arguments, e.g.
            ``{"gru_d": {"hidden": 64}, "sgl_mlp": {}}``; one encoder per modality.
            An entry whose value is null is removed, so the override
            ``model.encoders.timm_image=null`` trains without images (``{}`` keeps
            the encoder with its defaults).
        fusion: the fusion strategy.
        adversary: the confound adversary.
        modality_dropout: probability of dropping each present modality of a
            training sample (never all of them).
        head_hidden: hidden width of the risk head (0 = linear).
        head_dropout: dropout before the risk head's output layer.
        aux_weight: weight of the auxiliary per-modality risk losses (0 = none). Each
            encoder's embedding gets its own linear risk head, trained on the samples
            where that modality is present (deep supervision, as in MedFuse's
            per-modality pretraining, in one stage): every encoder keeps learning its
            own signal even when the fused head leans on another modality.
        confound_offsets: confounds (``site``, ``ancestry``) whose classes get a logit
            offset, added to the risk logit (and each auxiliary head's) in the training
            loss only, never at prediction, and profiled out rather than learned
            (``fusion/offsets.py``): the encoders learn from patients of the same site
            and ancestry, and the confound's own share of the outcome stays out of the
            deployed model.
        confound_offset_rate: damping of the offsets' Newton step per batch.
        gene_environment: a modality (``timeseries``) whose risk the genes may modify:
            the risk logit gains a linear read of the genes (``gene_environment_input``)
            times that modality's auxiliary logit, standardized
            (``fusion/gene_environment.py``).
            Needs the genomics encoder, that modality's encoder and ``aux_weight > 0``.
            None = no such term.
        gene_environment_input: what the term's modifier reads: ``dosages``, the
            standardized dosages of the genes the genotype path kept for their
            interaction (``sgl_mlp.interaction_groups``), or ``embedding``, the genotype
            encoder's embedding.
        gene_environment_lr: the term's learning rate as a multiple of ``optim.lr``. The
            term is linear in its few weights and its input is fixed, so it can move
            faster than the encoders, whose best epoch (early stopping) comes early.
        gene_environment_hidden: width of the modifier's nonlinear read of its input,
            added to the linear read (0 = linear only; ``fusion/gene_environment.py``).
    """

    encoders: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"timm_image": {}, "gru_d": {}, "sgl_mlp": {}}
    )
    fusion: FusionConfig = field(default_factory=FusionConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    modality_dropout: float = 0.0
    head_hidden: int = 0
    head_dropout: float = 0.1
    aux_weight: float = 0.0
    confound_offsets: list[str] = field(default_factory=list)
    confound_offset_rate: float = 0.2
    gene_environment: str | None = None
    gene_environment_input: str = "dosages"
    gene_environment_lr: float = 1.0
    gene_environment_hidden: int = 0

    def __post_init__(self) -> None:
        self.encoders = {k: v for k, v in self.encoders.items() if v is not None}


def modality_dropout_mask(
    present: Tensor, p: float, generator: torch.Generator | None = None
) -> Tensor:
    """Drops each present modality with probability ``p``, keeping at least one per sample.

    When every present modality of a sample is drawn for dropping, one of them,
    chosen uniformly, is kept (samples with nothing present stay empty).

    Shapes:
        present: (B, M) bool; output: (B, M) bool, a subset of ``present``
    """
    draw = torch.rand(present.shape, generator=generator, device=present.device)
    keep = present & (draw >= p)
    lost = present.any(dim=1) & ~keep.any(dim=1)  # (B,)
    pick = torch.rand(present.shape, generator=generator, device=present.device)
    rescue = pick.masked_fill(~present, -1.0).argmax(dim=1)  # (B,) a random present modality
    rescue_mask = nn.functional.one_hot(rescue, present.shape[1]).bool() & lost.unsqueeze(1)
    return keep | rescue_mask


def risk_head(
    in_dim: int, hidden: int = 0, dropout: float = 0.1, prior_logit: float = 0.0
) -> nn.Module:
    """The risk head, its output bias set to the training prevalence's log-odds."""
    if hidden > 0:
        out = nn.Linear(hidden, 1)
        head: nn.Module = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), out
        )
    else:
        head = out = nn.Linear(in_dim, 1)
    nn.init.constant_(out.bias, prior_logit)
    return head


class FusionModel(nn.Module):
    """Encoders, a fusion strategy, a risk head and an optional confound adversary.

    Args:
        encoders: modality -> encoder (the key must equal ``encoder.modality``).
        fusion: the fusion strategy; built with the encoders' ``embed_dim``.
        spec: the DataSpec (class counts for the adversary, prevalence for the head bias).
        adversary: adversary settings (None or disabled = no adversary).
        head: the risk head (default: linear, bias at the prior log-odds); unused when
            ``fusion.produces_logit``.
        modality_dropout: see ``modality_dropout_mask``; applied in training mode only.
        gene_environment: see ``ModelConfig.gene_environment``.

    Attributes:
        gxe: the gene x environment term (``fusion/gene_environment.py``), or None.
        gxe_note: why the configured term is left out or reads no gene, else None.
        eraser: the LEACE eraser of ``adversary.erase`` confounds (``fusion/erasure.py``)
            applied to the fused representation before the risk head; None when no
            confound is erased, the identity until ``training.run`` fits it.

    Shapes:
        forward(batch) -> logit (B,), fused (B, D), embeddings {m: ((B, D_m), (B,))},
        adversary_logits {head: (B, K)}
    """

    def __init__(
        self,
        encoders: dict[str, ModalityEncoder],
        fusion: FusionModule,
        spec: DataSpec,
        adversary: AdversaryConfig | None = None,
        head: nn.Module | None = None,
        modality_dropout: float = 0.0,
        aux_weight: float = 0.0,
        confound_offsets: Collection[str] = (),
        confound_offset_rate: float = 0.2,
        gene_environment: str | None = None,
        gene_environment_input: str = "dosages",
        gene_environment_lr: float = 1.0,
        gene_environment_hidden: int = 0,
    ) -> None:
        super().__init__()
        _check_encoders(encoders)
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.spec = spec
        self.modality_dropout = modality_dropout
        self.adversary_cfg = adversary or AdversaryConfig()
        self.head = (
            None
            if fusion.produces_logit
            else (head or risk_head(fusion.out_dim, prior_logit=_prior_logit(spec)))
        )
        if fusion.produces_logit and isinstance(getattr(fusion, "prior", None), nn.Parameter):
            nn.init.constant_(fusion.prior, _prior_logit(spec))  # the no-modality logit
        dims = {m: e.embed_dim for m, e in encoders.items()}
        self.adversary: ConfoundAdversary | None = build_adversary(
            self.adversary_cfg, fusion.out_dim, confound_classes(spec), dims
        )
        self.eraser = _build_eraser(self.adversary_cfg.erase, fusion, spec)
        if gene_environment_lr <= 0:
            raise ValueError(f"gene_environment_lr must be > 0, got {gene_environment_lr}")
        self.gene_environment = gene_environment
        self.gene_environment_lr = gene_environment_lr
        self.gene_environment_input = gene_environment_input
        self.gxe, self.gxe_note = _build_gene_environment(
            gene_environment,
            gene_environment_input,
            encoders,
            aux_weight,
            self.eraser,
            gene_environment_hidden,
        )
        self.aux_weight = aux_weight
        self.aux_heads = (
            nn.ModuleDict(
                {
                    m: risk_head(e.embed_dim, prior_logit=_prior_logit(spec))
                    for m, e in encoders.items()
                }
            )
            if aux_weight > 0
            else None
        )
        self.confound_offsets: ConfoundOffsets | None = build_offsets(
            confound_offsets,
            confound_classes(spec),
            heads=1 + (len(self.aux_heads) if self.aux_heads is not None else 0),
            rate=confound_offset_rate,
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def forward(self, batch: dict[str, Any], absent: Collection[str] = ()) -> dict[str, Any]:
        """Runs the model.

        Args:
            batch: the batch dict (``datasets/batch.py``).
            absent: modalities to treat as missing for every sample (attribution).
        """
        embeddings, tokens = self.encode(batch)
        out = self.fuse(embeddings, tokens, absent)
        out["encoded"] = embeddings  # before modality dropout (auxiliary losses)
        return out

    def fuse(
        self, embeddings: Embeddings, tokens: Tokens, absent: Collection[str] = ()
    ) -> dict[str, Any]:
        """Fusion, head and adversary on already-computed encodings.

        Lets attribution and scoring leave modalities out without rerunning the
        encoders (the image CNN dominates the cost).
        """
        self._check_absent(absent)
        genes = tokens.get(GENE_INPUT_KEY)  # the gene x environment term's dosages
        keep = self._keep_mask(embeddings, absent)  # (B, M)
        embeddings, tokens = _apply_keep(embeddings, tokens, keep, self.modalities)
        fused = self.fusion(embeddings, tokens if self.fusion.uses_tokens else None)  # (B, D)
        fused = self._erase(fused)  # (B, D)
        logit = fused[:, 0] if self.head is None else self.head(fused).squeeze(-1)  # (B,)
        if self.gxe is not None:
            logit = logit + self.gene_environment_term(embeddings, genes)
        return {
            "logit": logit,
            "fused": fused,
            "embeddings": embeddings,
            "adversary_logits": self._adversary(fused, embeddings),
        }

    def fuse_variants(
        self, embeddings: Embeddings, tokens: Tokens, variants: list[Collection[str]]
    ) -> dict[str, Any]:
        """``fuse`` once per variant (modalities to leave out), sharing the work it can.

        Equals ``[self.fuse(embeddings, tokens, absent=v) for v in variants]`` (within
        float rounding); a fusion with ``forward_variants`` builds its tokens once.
        The fusion's per-forward views (``last_attention``, ``last_gates``, ...) are
        the first variant's. No adversary logits (an inference helper).

        Returns:
            ``logit (B, V)``, ``fused (B, V, D)``, and ``embeddings`` as ``fuse`` with
            nothing left out.

        Shapes:
            -> logit (B, V), fused (B, V, D)
        """
        for gone in variants:
            self._check_absent(gone)
        keep = self._keep_mask(embeddings, ())  # (B, M)
        kept, kept_tokens = _apply_keep(embeddings, tokens, keep, self.modalities)
        if self.training or not hasattr(self.fusion, "forward_variants"):
            # Last run = first variant, so views such as ``last_gates`` describe it.
            outs = [self.fuse(embeddings, tokens, absent=gone) for gone in variants[::-1]][::-1]
            logit = torch.stack([o["logit"] for o in outs], dim=1)  # (B, V)
            fused = torch.stack([o["fused"] for o in outs], dim=1)  # (B, V, D)
            return {"logit": logit, "fused": fused, "embeddings": kept}
        toks = kept_tokens if self.fusion.uses_tokens else None
        fused = self._erase(self.fusion.forward_variants(kept, toks, variants))  # (B, V, D)
        logit = fused[..., 0] if self.head is None else self.head(fused).squeeze(-1)  # (B, V)
        if self.gxe is not None:
            # (B,), 0 where either modality is absent
            term = self.gene_environment_term(kept, tokens.get(GENE_INPUT_KEY))
            pair = (GENE_MODALITY, self.gene_environment)
            on = torch.tensor([not set(pair) & set(gone) for gone in variants], device=term.device)
            logit = logit + term.unsqueeze(1) * on  # (B, V)
        return {"logit": logit, "fused": fused, "embeddings": kept}

    def gene_environment_term(self, embeddings: Embeddings, genes: Tensor | None = None) -> Tensor:
        """The gene x environment term (``model.gene_environment``) that ``fuse`` adds to
        the risk logit, on its own: (B,), 0 where either modality is absent.

        Args:
            embeddings: ``encode``'s embeddings (what ``fuse`` kept, for a variant).
            genes: the interaction genes' dosages (``encode``'s tokens under
                ``GENE_INPUT_KEY``), needed when the modifier reads dosages.
        """
        gene, gene_here = embeddings[GENE_MODALITY]
        if self.gene_environment_input == "dosages":
            if genes is None:
                raise ValueError(
                    "the gene x environment term reads dosages: pass the tokens of "
                    "FusionModel.encode to fuse"
                )
            gene = genes
        env, env_here = embeddings[self.gene_environment]
        env_logit = self.aux_heads[self.gene_environment](env).squeeze(-1)  # (B,)
        return self.gxe(gene, env_logit, gene_here.bool() & env_here.bool())

    def _check_absent(self, absent: Collection[str]) -> None:
        unknown = set(absent) - set(self.encoders)
        if unknown:
            raise ValueError(
                f"absent modalities {sorted(unknown)} are not in the model {self.modalities}"
            )

    def encode(self, batch: dict[str, Any]) -> tuple[Embeddings, Tokens]:
        """Every encoder's embedding, and its tokens when the fusion reads tokens."""
        embeddings, tokens = {}, {}
        for m, enc in self.encoders.items():
            if self.fusion.uses_tokens and has_tokens(enc):
                embeddings[m], tokens[m] = _encode_with_tokens(enc, batch)
            else:
                embeddings[m] = enc(batch)
        if self.gxe is not None and self.gene_environment_input == "dosages":
            tokens[GENE_INPUT_KEY] = self.encoders[GENE_MODALITY].interaction_inputs(batch)
        return embeddings, tokens

    def set_progress(self, progress: float) -> float:
        """Sets the gradient-reversal strength from training progress in [0, 1]; returns it."""
        cfg = self.adversary_cfg
        lambd = dann_lambda(progress, cfg.lambda_max, cfg.gamma)
        if self.adversary is not None:
            self.adversary.lambd = lambd
        return lambd

    def adversary_loss(
        self, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted adversary loss and its per-head terms (zero without an adversary)."""
        if self.adversary is None or not outputs["adversary_logits"]:
            return outputs["logit"].new_zeros(()), {}
        present = {m: p for m, (_, p) in outputs["embeddings"].items()}
        total, parts = self.adversary.loss(outputs["adversary_logits"], batch["confounds"], present)
        return self.adversary_cfg.weight * total, parts

    def aux_logits(self, outputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Each auxiliary head's logit on its encoder's embedding (before modality dropout).

        Computed once per forward pass and kept in ``outputs["aux_logits"]``, so the
        confound offsets and the auxiliary loss of a training step read the same logits.

        Shapes:
            -> logits (B, M), present (B, M) bool, in ``aux_heads`` order
        """
        cached = outputs.get("aux_logits")
        if cached is not None:
            return cached
        logits, present = [], []
        for m, head in self.aux_heads.items():
            emb, here = outputs["encoded"][m]  # (B, D_m), (B,)
            logits.append(head(emb).squeeze(-1))
            present.append(here.bool())
        outputs["aux_logits"] = torch.stack(logits, dim=1), torch.stack(present, dim=1)
        return outputs["aux_logits"]

    def confound_offset(
        self, outputs: dict[str, Any], batch: dict[str, Any], pos_weight: Tensor | None = None
    ) -> Tensor | None:
        """Profiles the ``confound_offsets`` on this batch, then returns them (training only).

        One damped Newton step moves each head's offsets toward the loss minimiser
        given the heads' current logits (``fusion/offsets.py``).

        Returns:
            (B, H) offsets of the fused head (column 0) and each auxiliary head, or
            None without offsets.
        """
        if self.confound_offsets is None:
            return None
        logits, valid = outputs["logit"].unsqueeze(1), None
        if self.aux_heads is not None:
            aux, present = self.aux_logits(outputs)
            logits = torch.cat([logits, aux], dim=1)  # (B, H)
            valid = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
        codes = batch["confounds"]
        self.confound_offsets.update(logits.detach(), batch["label"], codes, pos_weight, valid)
        return self.confound_offsets(codes)

    def aux_loss(
        self, outputs: dict[str, Any], label: Tensor, loss_fn: Any, offset: Tensor | None = None
    ) -> Tensor:
        """Weighted mean over modalities of each auxiliary head's risk loss.

        Each head sees its encoder's embedding before modality dropout, on the samples
        where the modality is present; ``loss_fn(logit, label)`` is the risk loss and
        ``offset`` (B, 1 + M) the ``confound_offset`` (column 1 + j added to head j's
        logit). Zero without auxiliary heads.
        """
        if self.aux_heads is None:
            return outputs["logit"].new_zeros(())
        logits, present = self.aux_logits(outputs)  # (B, M), (B, M)
        if offset is not None:
            logits = logits + offset[:, 1:]
        terms = []
        for j in range(logits.shape[1]):
            here = present[:, j]
            if here.any():
                terms.append(loss_fn(logits[here, j], label[here]))
            else:  # keep the head in the graph so every parameter gets a (zero) gradient
                terms.append(logits[:0, j].sum())
        return self.aux_weight * torch.stack(terms).mean()

    def adversary_head_loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        """The heads' own loss on the detached representation (head-only updates)."""
        if self.adversary is None:
            return outputs["logit"].new_zeros(())
        emb = outputs["embeddings"] if self.adversary_cfg.on_modalities else None
        preds = self.adversary.head_logits(outputs["fused"], emb)
        present = {m: p for m, (_, p) in outputs["embeddings"].items()}
        return self.adversary.loss(preds, batch["confounds"], present)[0]

    def refresh_adversary(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """``outputs`` with the adversary logits recomputed (after head-only updates)."""
        return {
            **outputs,
            "adversary_logits": self._adversary(outputs["fused"], outputs["embeddings"]),
        }

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The encoders' groups (discriminative LRs) plus fusion/head/adversary groups.

        Biases, norms and other 1-D parameters of the fusion side get no weight decay.
        The gene x environment term has its own group at ``gene_environment_lr * lr``.
        """
        groups = [g for enc in self.encoders.values() for g in enc.param_groups(lr, weight_decay)]
        own = [
            p
            for n, p in self.named_parameters()
            if not n.startswith(("encoders.", "gxe.")) and p.requires_grad
        ]
        if self.gxe is not None:
            groups.append(
                {
                    "params": list(self.gxe.parameters()),
                    "lr": lr * self.gene_environment_lr,
                    "weight_decay": 0.0,
                }
            )
        decay = [p for p in own if p.ndim >= 2]
        no_decay = [p for p in own if p.ndim < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay}] if decay else []
        groups += [{"params": no_decay, "lr": lr, "weight_decay": 0.0}] if no_decay else []
        return groups

    def regularization_loss(self) -> Tensor:
        """Sum of the encoders' extra penalties."""
        device = next(self.parameters()).device
        return sum(
            (e.regularization_loss() for e in self.encoders.values()),
            torch.zeros((), device=device),
        )

    def after_optimizer_step(self, lr: float) -> None:
        for enc in self.encoders.values():
            enc.after_optimizer_step(lr)

    def on_epoch_start(self, epoch: int) -> None:
        for enc in self.encoders.values():
            enc.on_epoch_start(epoch)

    def _keep_mask(self, embeddings: Embeddings, absent: Collection[str]) -> Tensor:
        present = torch.stack([embeddings[m][1].bool() for m in self.modalities], dim=1)  # (B, M)
        if self.training and self.modality_dropout > 0:
            present = modality_dropout_mask(present, self.modality_dropout)
        gone = torch.tensor([m in absent for m in self.modalities], device=present.device)
        return present & ~gone

    def _erase(self, fused: Tensor) -> Tensor:
        return fused if self.eraser is None else self.eraser(fused)

    def _adversary(self, fused: Tensor, embeddings: Embeddings) -> dict[str, Tensor]:
        if self.adversary is None:
            return {}
        return self.adversary(fused, embeddings if self.adversary_cfg.on_modalities else None)


def build_model(cfg: ModelConfig, spec: DataSpec) -> FusionModel:
    """Builds encoders, fusion, head and adversary from a ``ModelConfig``."""
    if not cfg.encoders:
        raise ValueError("model config lists no encoders; configure at least one")
    encoders: dict[str, ModalityEncoder] = {}
    for name, kwargs in cfg.encoders.items():
        enc = create_encoder(name, spec=spec, **kwargs)
        if enc.modality in encoders:
            raise ValueError(
                f"encoders {name!r} and another both encode {enc.modality!r}; keep one"
            )
        encoders[enc.modality] = enc
    fusion = create_fusion(
        cfg.fusion.name,
        in_dims={m: e.embed_dim for m, e in encoders.items()},
        token_dims={m: token_dim(e) for m, e in encoders.items() if has_tokens(e)},
        **cfg.fusion.cfg,
    )
    head = risk_head(fusion.out_dim, cfg.head_hidden, cfg.head_dropout, _prior_logit(spec))
    return FusionModel(
        encoders,
        fusion,
        spec,
        cfg.adversary,
        head,
        cfg.modality_dropout,
        cfg.aux_weight,
        cfg.confound_offsets,
        cfg.confound_offset_rate,
        cfg.gene_environment,
        cfg.gene_environment_input,
        cfg.gene_environment_lr,
        cfg.gene_environment_hidden,
    )


def has_tokens(encoder: ModalityEncoder) -> bool:
    """Whether the encoder has its own token sequence (not the pooled default)."""
    return type(encoder).forward_tokens is not ModalityEncoder.forward_tokens


def token_dim(encoder: ModalityEncoder) -> int:
    """Token width: ``encoder.token_dim`` when the encoder declares it, else ``embed_dim``."""
    return int(getattr(encoder, "token_dim", 0) or encoder.embed_dim)


def _encode_with_tokens(
    enc: ModalityEncoder, batch: dict[str, Any]
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    # An encoder may offer both in one pass; otherwise it runs twice.
    if hasattr(enc, "forward_with_tokens"):
        emb, present, toks = enc.forward_with_tokens(batch)
        return (emb, present), toks
    return enc(batch), enc.forward_tokens(batch)


def _apply_keep(
    embeddings: Embeddings, tokens: Tokens, keep: Tensor, modalities: list[str]
) -> tuple[Embeddings, Tokens]:
    """Marks dropped modalities absent and zeroes their embeddings."""
    out_e, out_t = {}, {}
    for i, m in enumerate(modalities):
        emb, _ = embeddings[m]
        k = keep[:, i]  # (B,)
        out_e[m] = (torch.where(k.unsqueeze(-1), emb, torch.zeros_like(emb)), k)
        if m in tokens:
            t, mask, age = tokens[m]
            out_t[m] = (t, mask.bool() & k.unsqueeze(-1), age)
    return out_e, out_t


def _check_encoders(encoders: dict[str, ModalityEncoder]) -> None:
    if not encoders:
        raise ValueError("FusionModel needs at least one encoder")
    for key, enc in encoders.items():
        if enc.modality != key:
            raise ValueError(
                f"encoder {type(enc).__name__} encodes {enc.modality!r} but is keyed {key!r}"
            )


def _build_eraser(erase: list[str], fusion: FusionModule, spec: DataSpec) -> ConceptEraser | None:
    """The LEACE eraser of ``erase`` confounds (identity until ``training.run`` fits it)."""
    if not erase:
        return None
    classes = confound_classes(spec)
    unknown = [c for c in erase if c not in classes]
    if unknown:
        raise ValueError(
            f"model.adversary.erase: unknown confound(s) {unknown}; known {sorted(classes)}"
        )
    if fusion.produces_logit:
        raise ValueError(
            f"model.adversary.erase needs a fused representation before a risk head; "
            f"fusion {type(fusion).__name__} produces the logit itself"
        )
    return ConceptEraser(fusion.out_dim, erase)


def _build_gene_environment(
    env: str | None,
    source: str,
    encoders: dict[str, ModalityEncoder],
    aux_weight: float,
    eraser: ConceptEraser | None,
    hidden: int = 0,
) -> tuple[GeneEnvironment | None, str | None]:
    """The gene x environment term and, when it is left out or reads no gene, why.

    A model without the genotype encoder or the environment's encoder (an encoder
    removed with ``model.encoders.NAME=null``) gets no term; a genotype encoder with no
    interaction genes chosen gets a term of the environment alone (its bias). Settings
    that contradict the term are errors.
    """
    if env is None:
        return None, None
    where = f"model.gene_environment={env!r}"
    if hidden < 0:
        raise ValueError(f"model.gene_environment_hidden must be >= 0, got {hidden}")
    if source not in ("dosages", "embedding"):
        raise ValueError(
            f"model.gene_environment_input={source!r}; choose 'dosages' or 'embedding'"
        )
    others = [m for m in MODALITIES if m != GENE_MODALITY]
    if env not in others:
        raise ValueError(f"{where}: the environment must be another modality, one of {others}")
    if GENE_MODALITY not in encoders or env not in encoders:
        return None, f"{where}: the model has no {GENE_MODALITY} or {env} encoder, so no term"
    if aux_weight <= 0:
        raise ValueError(
            f"{where} reads the {env} auxiliary head's logit as the environment; "
            f"set model.aux_weight > 0, or model.gene_environment=null"
        )
    if eraser is not None:
        raise ValueError(
            f"{where} adds to the logit outside the risk head, which model.adversary.erase "
            f"refits alone; use one or the other"
        )
    genes = encoders[GENE_MODALITY]
    if source == "embedding":
        return GeneEnvironment(genes.embed_dim, hidden), None
    if not hasattr(genes, "interaction_inputs"):
        return None, (
            f"{where}: the genotype encoder {type(genes).__name__} has no dosage read for "
            f"the term, so no term (model.gene_environment_input=embedding reads its embedding)"
        )
    k = int(genes.interaction_columns.numel())
    note = None
    if k == 0:
        note = (
            f"{where}: no gene was kept for its interaction (model.encoders.sgl_mlp."
            f"interaction_groups is {genes.cfg.interaction_groups}; the genotype path with "
            f"path_interaction=timeseries chooses them), so the term reads no gene"
        )
    return GeneEnvironment(k, hidden), note


def confound_classes(spec: DataSpec) -> dict[str, int]:
    """Number of classes of each categorical confound the DataSpec knows."""
    return {"site": len(spec.sites), "ancestry": len(spec.ancestries)}


def _prior_logit(spec: DataSpec) -> float:
    # pos_weight = negatives / positives, so the prior log-odds is -log(pos_weight).
    return -math.log(spec.pos_weight) if spec.pos_weight > 0 else 0.0
