"""Genotype encoder that passes messages over a marker -> gene/pathway graph.

Markers are nodes carrying the subject's standardized dosage and missing-call
flag; genes or pathways (``DataSpec.groups``) are nodes with learned
embeddings. Messages flow marker -> group (bipartite ``SAGEConv``, Hamilton et
al. 2017), then group -> group over edges between groups that share markers or
that the user supplies, and an attention pooling over group nodes gives the
subject's embedding.

Batching: every subject has the same graph, only node features differ. PyG's
``MessagePassing`` gathers and scatters along ``node_dim=-2``, so node features
of shape ``(B, N, F)`` go through ONE shared ``edge_index``. This is the same
computation as ``Batch.from_data_list`` over B copies of the graph, without
building B copies of the edge index, a batch vector, or flattening and
unflattening B x N nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from torch_geometric.utils import coalesce, to_undirected

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.base import ModalityEncoder, register_encoder
from clinfuse.encoders.genomics import (
    binomial_scale,
    check_genotype_spec,
    read_genotype,
    standardize_genotype,
)


@dataclass
class PathwayGNNConfig:
    """Settings of ``pathway_gnn``.

    Attributes:
        hidden: width of marker and group node states.
        embed_dim: D, the width of the embedding.
        group_layers: rounds of group -> group message passing.
        shared_marker_edges: link two groups when they share a marker.
        marker_params: learn a per-marker dosage gain and bias (per-variant
            effects); off, markers within a group are exchangeable.
        aggr: neighbour aggregation of the convolutions ("mean", "sum", "max").
        dropout: dropout on node states.
    """

    hidden: int = 32
    embed_dim: int = 64
    group_layers: int = 1
    shared_marker_edges: bool = True
    marker_params: bool = True
    aggr: str = "mean"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.embed_dim < 1 or self.group_layers < 0:
            raise ValueError(f"pathway_gnn: bad sizes in {self}")
        if self.aggr not in ("mean", "sum", "max"):
            raise ValueError(f"pathway_gnn: aggr={self.aggr!r}; choose mean, sum or max")


@dataclass
class PathwayGraph:
    """The shared graph.

    Attributes:
        marker_to_group: (2, E) edges, row 0 a marker index, row 1 a group index.
        group_edges: (2, E_g) undirected group -> group edges with self-loops.
    """

    marker_to_group: Tensor
    group_edges: Tensor


def build_pathway_graph(
    spec: DataSpec,
    memberships: list[tuple[str, str]] | None = None,
    group_edges: list[tuple[str, str]] | None = None,
    shared_marker_edges: bool = True,
) -> PathwayGraph:
    """Builds marker -> group and group -> group edges.

    Args:
        spec: each marker belongs to ``groups[marker_groups[m]]``.
        memberships: extra (marker, group) pairs, e.g. a variant in several pathways.
        group_edges: user-supplied (group, group) pairs, e.g. pathway crosstalk.
        shared_marker_edges: also link groups that share at least one marker.
    """
    check_genotype_spec(spec)
    m2g = _membership_edges(spec, memberships or [])
    pairs = [_name_edges(spec.groups, group_edges or [], "group_edges")]
    if shared_marker_edges:
        pairs.append(_shared_marker_edges(m2g, spec.n_markers, spec.n_groups))
    loops = torch.arange(spec.n_groups).repeat(2, 1)  # self-loops keep the root path
    g2g = to_undirected(torch.cat([*pairs, loops], dim=1), num_nodes=spec.n_groups)
    return PathwayGraph(m2g, g2g)


def _membership_edges(spec: DataSpec, extra: list[tuple[str, str]]) -> Tensor:
    markers = torch.arange(spec.n_markers)
    base = torch.stack([markers, torch.tensor(spec.marker_groups, dtype=torch.long)])
    if not extra:
        return base
    m_index = {name: i for i, name in enumerate(spec.markers)}
    g_index = {name: i for i, name in enumerate(spec.groups)}
    rows = [
        (_lookup(m_index, m, "memberships marker"), _lookup(g_index, g, "memberships group"))
        for m, g in extra
    ]
    edges = torch.cat([base, torch.tensor(rows, dtype=torch.long).T], dim=1)
    return coalesce(edges)  # drops duplicates, sorts by marker


def _name_edges(names: list[str], pairs: list[tuple[str, str]], what: str) -> Tensor:
    index = {name: i for i, name in enumerate(names)}
    rows = [(_lookup(index, a, what), _lookup(index, b, what)) for a, b in pairs]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2).T


def _lookup(index: dict[str, int], name: str, what: str) -> int:
    if name not in index:
        raise ValueError(f"pathway graph: {what} {name!r} is not in the DataSpec")
    return index[name]


def _shared_marker_edges(m2g: Tensor, n_markers: int, n_groups: int) -> Tensor:
    """Pairs of distinct groups with a marker in common. Shapes: (2, E) -> (2, E_g)"""
    member = torch.zeros(n_markers, n_groups)
    member[m2g[0], m2g[1]] = 1.0
    shared = (member.T @ member) > 0  # (G, G)
    shared.fill_diagonal_(False)
    return shared.nonzero().T


class PathwayGNNEncoder(ModalityEncoder):
    """Marker -> group -> group message passing with attention pooling over groups.

    With ``z_m`` the standardized dosage (0 when missing) and ``c_m`` the missing flag:
    ``h_m = act(W [z_m, c_m] + z_m a_m + b_m)``;
    ``h_g = act(SAGE((h_m), e_g))`` over markers of g, then residual SAGE rounds
    over group edges; ``out = W_o sum_g softmax_g(w^T h_g) h_g``.

    Shapes:
        genotype, genotype_mask: (B, M); genotype_present: (B,)
        output: embedding (B, D), present (B,) bool
    """

    modality = "genomics"

    def __init__(
        self, spec: DataSpec, cfg: PathwayGNNConfig | None = None, graph: PathwayGraph | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg or PathwayGNNConfig()
        graph = graph or build_pathway_graph(spec, shared_marker_edges=self.cfg.shared_marker_edges)
        self.embed_dim, self.group_names = self.cfg.embed_dim, list(spec.groups)
        self._register_buffers(spec, graph)
        self._build_layers(spec.n_markers, spec.n_groups)
        self._register_load_state_dict_pre_hook(_drop_gate_bias)

    def _register_buffers(self, spec: DataSpec, graph: PathwayGraph) -> None:
        mean = torch.tensor(spec.marker_mean, dtype=torch.float32)
        self.register_buffer("marker_mean", mean)
        self.register_buffer("marker_scale", binomial_scale(mean))
        self.register_buffer("marker_to_group", graph.marker_to_group)
        self.register_buffer("group_edges", graph.group_edges)

    def _build_layers(self, n_markers: int, n_groups: int) -> None:
        h, cfg = self.cfg.hidden, self.cfg
        self.marker_in = nn.Linear(2, h)
        if cfg.marker_params:
            self.marker_gain = nn.Parameter(torch.randn(n_markers, h) * 0.1)
            self.marker_bias = nn.Parameter(torch.zeros(n_markers, h))
        self.group_embed = nn.Parameter(torch.randn(n_groups, h) * 0.1)
        self.to_group = SAGEConv((h, h), h, aggr=cfg.aggr)
        self.group_convs = nn.ModuleList(
            SAGEConv(h, h, aggr=cfg.aggr) for _ in range(cfg.group_layers)
        )
        # No bias: softmax over groups is invariant to a constant added to every
        # logit, so a bias would never receive a gradient.
        self.gate = nn.Linear(h, 1, bias=False)
        self.out = nn.Linear(h, cfg.embed_dim)
        self.act, self.drop = nn.GELU(), nn.Dropout(cfg.dropout)

    def marker_states(self, batch: dict[str, Any]) -> Tensor:
        """Marker node states from the subject's calls. Shapes: (B, M, H)"""
        x, mask = read_genotype(batch, self.marker_mean.numel())
        z = standardize_genotype(x, mask, self.marker_mean, self.marker_scale)  # (B, M)
        h = self.marker_in(torch.stack([z, 1 - mask], dim=-1))  # (B, M, H)
        if self.cfg.marker_params:
            h = h + z.unsqueeze(-1) * self.marker_gain + self.marker_bias
        return self.drop(self.act(h))

    def group_states(self, batch: dict[str, Any]) -> Tensor:
        """Group node states after all message passing. Shapes: (B, G, H)"""
        h_m = self.marker_states(batch)  # (B, M, H)
        h_g = self.group_embed.expand(h_m.shape[0], -1, -1)  # (B, G, H)
        h_g = self.drop(self.act(self.to_group((h_m, h_g), self.marker_to_group)))
        for conv in self.group_convs:
            h_g = h_g + self.drop(self.act(conv(h_g, self.group_edges)))  # (B, G, H)
        return h_g

    def group_attention(self, batch: dict[str, Any]) -> Tensor:
        """Pooling weights per group (sum to 1 per subject). Shapes: (B, G)"""
        return torch.softmax(self.gate(self.group_states(batch)).squeeze(-1), dim=-1)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        h_g = self.group_states(batch)  # (B, G, H)
        attn = torch.softmax(self.gate(h_g), dim=1)  # (B, G, 1)
        emb = self.out((attn * h_g).sum(dim=1))  # (B, D)
        return emb, batch["genotype_present"].bool()


def _drop_gate_bias(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Older checkpoints carry ``gate.bias``; it never changed an output (see ``gate``)."""
    state_dict.pop(prefix + "gate.bias", None)


@register_encoder("pathway_gnn")
def pathway_gnn(
    spec: DataSpec,
    hidden: int = 32,
    embed_dim: int = 64,
    group_layers: int = 1,
    shared_marker_edges: bool = True,
    marker_params: bool = True,
    aggr: str = "mean",
    dropout: float = 0.1,
    memberships: list[tuple[str, str]] | None = None,
    group_edges: list[tuple[str, str]] | None = None,
) -> PathwayGNNEncoder:
    """Builds the pathway GNN genotype encoder (see ``PathwayGNNConfig``).

    ``memberships`` adds (marker, group) pairs; ``group_edges`` adds (group, group) pairs.
    """
    cfg = PathwayGNNConfig(
        hidden, embed_dim, group_layers, shared_marker_edges, marker_params, aggr, dropout
    )
    graph = build_pathway_graph(spec, memberships, group_edges, shared_marker_edges)
    return PathwayGNNEncoder(spec, cfg, graph)
