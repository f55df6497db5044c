"""Cross-modal attention fusion: a learned query attends over modality tokens.

Tokens are each modality's pooled embedding and, when ``use_tokens`` is on, the
encoders' token sequences (time-series steps, image patches), all projected to
one width. Every token carries a learned type embedding (modality x pooled/step)
and an encoding of its age, ``MLP(log1p(hours before prediction_time))``, so a
three-day-old image is not read as a fresh one. An always-present learned "null"
token keeps the output finite when a sample has no modality at all.

The attention pooling follows the Perceiver/Set-Transformer PMA pattern (Lee et
al. 2019, "Set Transformer"); key-padding masks drop missing modalities and
padded tokens. With ``queries: k`` there are k learned seed vectors (PMA_k), each
attending on its own; their outputs are concatenated and projected back to
``dim``. One query outputs a convex combination of token values per head, which
an additive risk (one term per modality) fits only through heads that each settle
on one modality; k queries give the pooling room for one per modality and more.

A pooled sum of token values is additive in the modalities until the FFN bends it;
``pairwise_rank: r`` adds explicit cross-modal products, low-rank bilinear terms
between every pair of present modalities (as in low-rank multimodal fusion, Liu et
al. 2018): ``sum_{m<n} P[(U_m e_m) * (U_n e_n)]``, so an effect of one modality
that depends on another (a physiological trend that matters more in carriers of a
gene variant) is one product away instead of a curve the FFN must fit.

Long token sequences give one learned query many near-duplicate keys to fit
noise with (128 GRU-D steps for 3,500 training patients overfit within an
epoch), so two regularizers act on the sequence tokens only, never on the
pooled ones: ``max_tokens`` mean-pools each sequence into at most that many
windows of consecutive tokens, and ``token_dropout`` masks each sequence token
with that probability during training (like modality dropout, but per token).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from clinfuse.fusion.base import FusionModule, register_fusion

NULL = "null"


class AttentionFusion(FusionModule):
    """Learned-query attention over modality tokens.

    ``x_j = W_{m(j)} t_j + type_{k(j)} + age_mlp(log1p(age_j))``;
    ``a_i = softmax(q_i K^T / sqrt(d))`` over unmasked tokens (+ null), per query i;
    ``h_i = FFN(LN(q_i + a_i V))``; ``z = h_1`` for one query, else
    ``z = W [h_1; ...; h_k]``.

    Args:
        in_dims: modality -> pooled embedding width D_m.
        token_dims: modality -> token width (default: ``in_dims``); only modalities
            listed here have their token sequences used.
        dim: common token width and output width.
        heads: attention heads.
        use_tokens: also attend over the encoders' token sequences.
        self_layers: transformer layers over the tokens before pooling (0 = none).
        queries: learned pooling queries (PMA seeds); more than one are concatenated
            and projected to ``dim``.
        dropout: attention and FFN dropout.
        max_tokens: mean-pool each token sequence into at most this many windows of
            consecutive tokens (0 = keep every token); a window's age is its
            freshest token's.
        token_dropout: training-time probability of masking each sequence token.
        pairwise_rank: rank r of the cross-modal product terms added to the output
            (0 = none); a pair contributes only when both modalities are present.

    Attributes:
        last_attention: modality (and "null") -> (B,) attention mass of the last
            forward, averaged over heads and queries and summed over the
            modality's tokens.

    Shapes:
        embeddings[m]: (B, D_m) and present (B,) bool
        tokens[m]: (B, T_m, D'_m), mask (B, T_m) bool, age (B, T_m) hours
        output: (B, dim)
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        token_dims: dict[str, int] | None = None,
        dim: int = 64,
        heads: int = 4,
        use_tokens: bool = True,
        self_layers: int = 0,
        dropout: float = 0.0,
        max_tokens: int = 0,
        token_dropout: float = 0.0,
        queries: int = 1,
        pairwise_rank: int = 0,
    ) -> None:
        super().__init__()
        if not in_dims:
            raise ValueError("attention fusion needs at least one modality in in_dims")
        if queries < 1:
            raise ValueError(f"attention fusion: queries={queries} must be >= 1")
        if pairwise_rank < 0:
            raise ValueError(f"attention fusion: pairwise_rank={pairwise_rank} must be >= 0")
        if max_tokens < 0:
            raise ValueError(f"attention fusion: max_tokens={max_tokens} must be >= 0")
        if not 0.0 <= token_dropout < 1.0:
            raise ValueError(f"attention fusion: token_dropout={token_dropout} must be in [0, 1)")
        self.max_tokens = max_tokens
        self.token_dropout = token_dropout
        self.modalities = sorted(in_dims)
        self.uses_tokens = use_tokens
        self.out_dim = dim
        token_dims = dict(in_dims if token_dims is None else token_dims)
        self.pooled_proj = nn.ModuleDict({m: nn.Linear(in_dims[m], dim) for m in self.modalities})
        self.token_proj = nn.ModuleDict(
            {m: nn.Linear(d, dim) for m, d in token_dims.items() if m in in_dims and use_tokens}
        )
        self.type_emb = nn.Embedding(2 * len(self.modalities), dim)  # pooled, step per modality
        self.age_mlp = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.query = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.merge = nn.Linear(queries * dim, dim) if queries > 1 else None
        self.encoder = _self_attention(dim, heads, self_layers, dropout)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pairwise = (
            PairwiseProducts({m: in_dims[m] for m in self.modalities}, pairwise_rank, dim)
            if pairwise_rank > 0 and len(self.modalities) > 1
            else None
        )
        self.last_attention: dict[str, Tensor] = {}

    def forward(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> Tensor:
        x, valid, owner = self._tokens(embeddings, tokens or {})  # (B, L, dim), (B, L), [L]
        out = self._pool(x, valid, owner)  # (B, dim)
        if self.pairwise is not None:
            out = out + self.pairwise(embeddings)
        return out

    def forward_variants(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]] | None,
        variants: list[Collection[str]],
    ) -> Tensor:
        """The output with each variant's modalities left out, tokens built ONCE.

        Leaving a modality out only masks its tokens (their values never reach the
        output), so every variant shares the projected, annotated tokens. Without
        self-attention layers one attention call serves all variants after the first:
        one query per variant, each with its own key mask. The first variant runs
        exactly as ``forward`` (same numbers bit for bit) and gives ``last_attention``.

        Shapes:
            -> (B, V, dim), V = len(variants)
        """
        x, valid, owner = self._tokens(embeddings, tokens or {})  # (B, L, dim), (B, L), [L]
        masks = torch.stack([valid & ~_owned_by(owner, gone, x.device) for gone in variants], 1)
        if self.encoder is not None or len(variants) == 1:  # self-attention sees the mask
            pooled = [self._pool(x, masks[:, v], owner) for v in reversed(range(len(variants)))]
            out = torch.stack(pooled[::-1], dim=1)
        else:
            rest = self._pool_variants(x, masks[:, 1:])  # (B, V-1, dim)
            out = torch.cat([self._pool(x, masks[:, 0], owner).unsqueeze(1), rest], dim=1)
        if self.pairwise is None:
            return out
        pairs = [self.pairwise(_without(embeddings, gone)) for gone in variants]
        return out + torch.stack(pairs, dim=1)  # (B, V, dim)

    def _pool(self, x: Tensor, valid: Tensor, owner: list[str]) -> Tensor:
        """Self-attention (optional), learned-query pooling, FFN. x (B, L, dim) -> (B, dim)."""
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~valid)
        query = self.query.expand(x.shape[0], -1, -1)  # (B, Q, dim)
        out, weights = self.attn(query, x, x, key_padding_mask=~valid, need_weights=True)
        self.last_attention = _mass_per_owner(weights.mean(1).detach(), owner)  # (B, Q, L)
        h = self.norm(query + out)  # (B, Q, dim)
        return self._merge(h + self.ffn(h))  # (B, dim)

    def _merge(self, h: Tensor) -> Tensor:
        """The queries' outputs to one vector. h (..., Q, dim) -> (..., dim)."""
        if self.merge is None:
            return h.squeeze(-2)
        return self.merge(h.flatten(-2))

    def _pool_variants(self, x: Tensor, masks: Tensor) -> Tensor:
        """The queries once per variant over shared keys. x (B, L, dim), masks (B, V, L) -> (B, V, dim)."""
        b, v, _ = masks.shape
        q = self.query.shape[1]
        query = self.query.repeat(1, v, 1).expand(b, -1, -1)  # (B, V*Q, dim), variant-major
        blocked = (~masks).repeat_interleave(q, dim=1)  # (B, V*Q, L)
        blocked = blocked.repeat_interleave(self.attn.num_heads, dim=0)  # (B*heads, V*Q, L)
        out, _ = self.attn(query, x, x, attn_mask=blocked, need_weights=False)
        h = self.norm(query + out)  # (B, V*Q, dim)
        return self._merge((h + self.ffn(h)).view(b, v, q, -1))  # (B, V, dim)

    def _tokens(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor, list[str]]:
        first = embeddings[self.modalities[0]][0]
        b = first.shape[0]
        xs = [self.null.expand(b, -1, -1)]
        valid = [torch.ones(b, 1, dtype=torch.bool, device=first.device)]
        owner = [NULL]
        for i, m in enumerate(self.modalities):
            for x, v in self._modality_tokens(i, m, embeddings[m], tokens.get(m)):
                xs.append(x)
                valid.append(v)
                owner += [m] * x.shape[1]
        return torch.cat(xs, dim=1), torch.cat(valid, dim=1), owner

    def _modality_tokens(
        self,
        index: int,
        modality: str,
        pooled: tuple[Tensor, Tensor],
        seq: tuple[Tensor, Tensor, Tensor] | None,
    ) -> list[tuple[Tensor, Tensor]]:
        emb, present = pooled
        use_seq = seq is not None and modality in self.token_proj
        # The pooled token's age is that of its freshest token when the encoder gives ages.
        age = _freshest_age(seq) if seq is not None else torch.zeros_like(emb[:, 0])
        x = self.pooled_proj[modality](_zero_absent(emb, present)).unsqueeze(1)
        out = [(self._annotate(x, 2 * index, age.unsqueeze(1)), present.unsqueeze(1))]
        if use_seq:
            t, mask, t_age = self._regularize(*seq)
            t = self.token_proj[modality](_zero_absent(t, mask))  # (B, T, dim)
            out.append((self._annotate(t, 2 * index + 1, t_age), mask & present.unsqueeze(1)))
        return out

    def _regularize(self, t: Tensor, mask: Tensor, age: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Window pooling (``max_tokens``), then token dropout in training mode.

        Shapes:
            t (B, T, D), mask (B, T), age (B, T) -> (B, T', D), (B, T'), (B, T')
        """
        mask = mask.bool()
        if self.max_tokens and t.shape[1] > self.max_tokens:
            t, mask, age = pool_token_windows(t, mask, age, self.max_tokens)
        if self.training and self.token_dropout > 0:
            mask = mask & (torch.rand(mask.shape, device=mask.device) >= self.token_dropout)
        return t, mask, age

    def _annotate(self, x: Tensor, type_id: int, age: Tensor) -> Tensor:
        """Adds the type embedding and the age encoding. x (B, T, dim), age (B, T)."""
        age_code = self.age_mlp(torch.log1p(age.clamp_min(0).to(x.dtype)).unsqueeze(-1))
        return x + self.type_emb.weight[type_id] + age_code


class PairwiseProducts(nn.Module):
    """Low-rank bilinear terms between every pair of present modality embeddings.

    ``y = P sum_{m<n} p_m p_n [(U_m e_m) * (U_n e_n)]`` with ``p`` the presence flags
    (Liu et al. 2018, "Efficient Low-rank Multimodal Fusion"). ``P`` starts small, so
    the terms enter training as a small correction to the pooled output.

    Shapes:
        embeddings[m]: (B, D_m) and present (B,) bool -> (B, out_dim)
    """

    def __init__(self, in_dims: dict[str, int], rank: int, out_dim: int) -> None:
        super().__init__()
        self.modalities = sorted(in_dims)
        self.factors = nn.ModuleDict({m: nn.Linear(in_dims[m], rank) for m in self.modalities})
        self.out = nn.Linear(rank, out_dim, bias=False)
        nn.init.normal_(self.out.weight, std=0.02)

    def forward(self, embeddings: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        z = {}
        for m in self.modalities:
            emb, present = embeddings[m]
            z[m] = self.factors[m](_zero_absent(emb, present)) * present.unsqueeze(-1)  # (B, r)
        total = 0.0
        for i, a in enumerate(self.modalities):
            for b in self.modalities[i + 1 :]:
                total = total + z[a] * z[b]  # (B, r)
        return self.out(total)  # (B, out_dim)


def _without(
    embeddings: dict[str, tuple[Tensor, Tensor]], gone: Collection[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``embeddings`` with the ``gone`` modalities marked absent."""
    return {m: (emb, present & (m not in gone)) for m, (emb, present) in embeddings.items()}


def pool_token_windows(
    t: Tensor, mask: Tensor, age: Tensor, windows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked mean of consecutive tokens in ``windows`` windows of ceil(T / windows).

    A window is valid when any of its tokens is; its age is the smallest valid
    age in it (its freshest token). The last window may be shorter (padding is
    masked, so it does not dilute the mean).

    Shapes:
        t (B, T, D), mask (B, T) bool, age (B, T) -> (B, W, D), (B, W), (B, W)
    """
    b, length, d = t.shape
    size = -(-length // windows)  # ceil
    pad = size * windows - length
    m = nn.functional.pad(mask, (0, pad)).view(b, windows, size)  # (B, W, S)
    x = nn.functional.pad(_zero_absent(t, mask), (0, 0, 0, pad)).view(b, windows, size, d)
    count = m.sum(-1, keepdim=True).clamp_min(1).to(t.dtype)  # (B, W, 1)
    pooled = x.sum(2) / count  # (B, W, D)
    a = nn.functional.pad(age, (0, pad)).view(b, windows, size).masked_fill(~m, float("inf"))
    a = a.amin(-1)  # (B, W)
    valid = m.any(-1)
    return pooled, valid, torch.where(valid, a, torch.zeros_like(a))


def _zero_absent(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))


def _freshest_age(seq: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Smallest age over valid tokens, 0 when none. Shapes: (B, T) -> (B,)."""
    _, mask, age = seq
    age = age.masked_fill(~mask, float("inf")).amin(dim=1)
    return torch.where(torch.isfinite(age), age, torch.zeros_like(age))


def _owned_by(owner: list[str], modalities: Collection[str], device: torch.device) -> Tensor:
    """(L,) bool: which tokens belong to ``modalities``."""
    return torch.tensor([o in modalities for o in owner], dtype=torch.bool, device=device)


def _mass_per_owner(weights: Tensor, owner: list[str]) -> dict[str, Tensor]:
    """Sums attention weights (B, L) over the tokens of each modality -> {m: (B,)}."""
    out: dict[str, Tensor] = {}
    for name in dict.fromkeys(owner):
        idx = torch.tensor([i for i, o in enumerate(owner) if o == name], device=weights.device)
        out[name] = weights.index_select(1, idx).sum(dim=1)
    return out


def _self_attention(dim: int, heads: int, layers: int, dropout: float) -> nn.Module | None:
    if layers <= 0:
        return None
    layer = nn.TransformerEncoderLayer(
        dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@register_fusion("attention")
def attention(in_dims: dict[str, int], **cfg) -> AttentionFusion:
    """Builds ``AttentionFusion`` (``token_dims``: the encoders that expose token sequences)."""
    return AttentionFusion(in_dims, **cfg)
