"""The discrete key bottleneck: H codebooks of K keys, EMA-tracked, each key selecting a learned value.

Data flow for encoder outputs hidden [B, L, dim] and attention_mask [B, L]:

1. Token selection. pooling="cls" keeps the first token of each row; pooling="mean" keeps every
   non-padding token. The kept vectors are the N "positions" (N = B for cls).
2. Projection to H heads of key_dim: "split" cuts dim into H slices (key_dim = dim // H), "random" applies a
   fixed random Gaussian matrix per head (as the DKVB paper does), "learned" a trainable one.
   The result, queries [N, H, key_dim], is what the keys quantise: the "pre-bottleneck vectors".
3. Lookup: ops.nearest_key gives each (position, head) its nearest key index.
4. Values: index selects a row of values [H, K, value_dim]; the H head values are averaged, then the
   positions of a row are averaged (padding never counts), giving pooled [B, value_dim]. The model's head
   decodes that to logits (or to a score for regression).

Codebook state (keys [H, K, key_dim], cluster_size [H, K], embed_sum [H, K, key_dim]) lives in float32
buffers and follows the data, never gradients: in training mode with key updates on, each forward
calls ops.ema_update_ with the queries of the kept positions; in eval mode (or after freeze_keys())
nothing in the module mutates.

How the encoder learns (the discrete lookup alone passes it no gradient):
- Commitment loss, always on when commitment_weight > 0: mean squared distance between each query and
  its assigned key (the key is a constant), returned as aux_loss = commitment_weight * commitment.
  It reaches the encoder and a "learned" projection.
- Soft assignment, opt-in with soft_temperature=tau: in training mode the values are mixed with weights
  softmax(-||q - key_k||^2 / tau) over the keys, so the task and distillation losses reach the queries
  too. Eval mode always uses the hard nearest key. Index, EMA and commitment always use the hard choice.
- Straight-through, opt-in with straight_through=True (and soft_temperature=tau): the forward pass is the
  hard lookup in training too; in the backward pass the values get their exact (hard) gradient and the
  queries get the gradient of the soft assignment.
- Row-sparse values, opt-in with sparse_values=True: the hard lookup's gradient w.r.t. the value table is a
  sparse tensor holding only the selected rows (keydistill.value_lookup), for keydistill.optim.LazyAdamW to
  update those rows alone. The soft assignment mixes every key, so its gradient stays dense.
- Feature loss toward another model's pre-bottleneck vectors (e.g. a teacher's): feature_loss(), for the
  training loop to add.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from keydistill import ops, value_lookup
from keydistill.ops.reference import cluster_stats, ema_apply_, smoothed_cluster_size

PROJECTIONS = ("split", "random", "learned")
POOLINGS = ("cls", "mean")
CODEBOOK_STATE = ("keys", "cluster_size", "embed_sum")
# BottleneckConfig fields that shape how a model learns, not what its codebook is: a student may set its own.
TRAINING_FIELDS = ("commitment_weight", "soft_temperature", "straight_through", "sparse_values")
# Those of them a student's training settings give (keydistill.train.config.TrainConfig.student_training).
STUDENT_TRAINING_FIELDS = ("commitment_weight", "soft_temperature", "straight_through")


@dataclass(frozen=True)
class BottleneckConfig:
    """Hyperparameters of a DiscreteKeyBottleneck; saved as JSON next to every checkpoint."""

    num_heads: int = 8  # H: independent codebooks, one per slice/projection of the encoder output
    num_keys: int = 256  # K: keys per codebook
    key_dim: int | None = None  # d: dimension of a key; None means dim // num_heads
    value_dim: int | None = None  # dimension of a value (and of the pooled output); None means dim
    decay: float = 0.99  # EMA decay of the codebook statistics
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    projection: str = "split"  # "split" | "random" (fixed, per head) | "learned" (trainable, per head)
    pooling: str = "cls"  # "cls": first token only; "mean": average over non-padding tokens
    # A key is dead, and restarted from a vector of the current batch, when its EMA count falls below
    # dead_key_threshold times the mean count of its head (a share, so it does not depend on batch size
    # or on how many vectors k-means saw). 0 disables restarts.
    dead_key_threshold: float = 0.01
    commitment_weight: float = 0.25  # weight of the commitment loss (encoder learning path); 0 turns it off
    soft_temperature: float | None = None  # tau of the soft assignment in training; None: always hard
    # With soft_temperature: keep the hard lookup in the forward pass (training computes what evaluation
    # computes) and take only the backward pass from the soft assignment (straight-through).
    straight_through: bool = False
    kmeans_iters: int = 10  # Lloyd iterations after k-means++ in init_keys_
    # The hard lookup gives the value table a row-sparse gradient (only the selected rows), for an optimizer
    # that updates those rows alone (keydistill.optim.make_optimizer). Same forward values, up to float
    # summation order. Worth it when the table is large (e.g. 32 x 4096 keys x 384: 50M values).
    sparse_values: bool = False

    def __post_init__(self):
        for name in ("num_heads", "num_keys"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        _require(
            isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 0,
            f"kmeans_iters must be an integer >= 0, got {self.kmeans_iters!r}",
        )
        for name in ("key_dim", "value_dim"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and value >= 1),
                f"{name} must be None or a positive integer, got {value!r}",
            )
        _require(0.0 <= self.decay < 1.0, f"decay must be in [0, 1), got {self.decay!r}")
        _require(self.eps > 0, f"eps must be > 0, got {self.eps!r}")
        _require(self.projection in PROJECTIONS, f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        _require(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        _require(self.dead_key_threshold >= 0, f"dead_key_threshold must be >= 0, got {self.dead_key_threshold!r}")
        _require(
            isinstance(self.sparse_values, bool), f"sparse_values must be True or False, got {self.sparse_values!r}"
        )
        problems = self.training_problems({name: getattr(self, name) for name in STUDENT_TRAINING_FIELDS})
        _require(not problems, "; ".join(problems))

    @staticmethod
    def training_problems(fields: dict, spell=str) -> list[str]:
        """What is wrong with the settings of how a model learns through the bottleneck (STUDENT_TRAINING_FIELDS,
        those in `fields`), each setting named by spell(name): the one place they are checked, for this class
        and for the training job's flags (spell=keydistill.train.config.flag_of)."""
        problems = []
        weight = fields.get("commitment_weight", 0.0)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            problems.append(f"{spell('commitment_weight')} must be a finite number >= 0, got {weight!r}")
        tau = fields.get("soft_temperature")
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            problems.append(f"{spell('soft_temperature')} must be a finite number > 0 (or none), got {tau!r}")
        if fields.get("straight_through") and tau is None:
            problems.append(
                f"{spell('straight_through')} takes its backward pass from the soft assignment: "
                f"set {spell('soft_temperature')} too"
            )
        return problems

    def key_dim_for(self, dim: int) -> int:
        """The key dimension on encoder outputs of width dim; ValueError when the two cannot fit."""
        key_dim = self.key_dim or dim // self.num_heads
        _require(key_dim >= 1, f"dim={dim} is smaller than num_heads={self.num_heads}; set key_dim")
        if self.projection == "split":
            _require(
                self.num_heads * key_dim == dim,
                f"projection='split' needs num_heads * key_dim == dim (the encoder "
                f"width), got {self.num_heads} * {key_dim} != {dim}",
            )
        return key_dim

    @property
    def learns_through_lookup(self) -> bool:
        """True when the task and distillation losses reach the encoder through the lookup (soft or
        straight-through assignment); with the hard lookup alone they stop at the values."""
        return self.soft_temperature is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def codebook(self) -> dict:
        """The fields that define the codebook and the values it indexes (all but TRAINING_FIELDS)."""
        return {k: v for k, v in self.to_dict().items() if k not in TRAINING_FIELDS}

    @classmethod
    def from_dict(cls, fields: dict) -> "BottleneckConfig":
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        _require(not unknown, f"unknown BottleneckConfig fields {sorted(unknown)}")
        return cls(**fields)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class BottleneckOutput:
    """What one bottleneck forward produces. N is the number of kept positions (B for cls pooling)."""

    pooled: torch.Tensor  # [B, value_dim]: decoded by the model's head
    queries: torch.Tensor  # [N, H, key_dim]: pre-bottleneck vectors (differentiable)
    key_indices: torch.Tensor  # [N, H] int64: the nearest key of each query
    positions: torch.Tensor  # [B, T] bool: which tokens were kept (T = 1 for cls pooling)
    commitment_loss: torch.Tensor  # scalar: mean ||query - assigned key||^2 per element (unweighted)
    aux_loss: torch.Tensor  # scalar: commitment_weight * commitment_loss, to add to the training loss


class DiscreteKeyBottleneck(nn.Module):
    """Maps encoder outputs [B, L, dim] to pooled values [B, value_dim] through H discrete codebooks."""

    def __init__(self, dim: int, config: BottleneckConfig):
        super().__init__()
        h, k = config.num_heads, config.num_keys
        self.dim, self.config = dim, config
        self.key_dim = config.key_dim_for(dim)
        self.value_dim = config.value_dim or dim
        if config.projection == "split":
            self.projection = None
        else:
            # Gaussian entries of variance 1/key_dim keep squared norms unchanged in expectation.
            weight = torch.randn(h, dim, self.key_dim) / math.sqrt(self.key_dim)
            if config.projection == "learned":
                self.projection = nn.Parameter(weight)
            else:
                self.register_buffer("projection", weight)
        # Placeholder keys until init_keys_; the EMA state starts consistent with them: each key "has seen"
        # one vector equal to itself (cluster_size 1, embed_sum = key), so the first update is a true average.
        keys = torch.randn(h, k, self.key_dim)
        self.register_buffer("keys", keys)
        self.register_buffer("cluster_size", torch.ones(h, k))
        self.register_buffer("embed_sum", keys.clone())
        self.values = nn.Parameter(torch.randn(h, k, self.value_dim) * 0.02)
        self.update_keys = True
        # Data parallelism: a hook that sums the codebook statistics across ranks before each EMA step
        # (keydistill.train.distributed.CodebookSync); None in a single process.
        self.sync = None
        # False under DistributedDataParallel, whose reducer takes dense gradients only (from modules other
        # than nn.Embedding): config.sparse_values then falls back to the dense value gradient, made
        # row-sparse again before the optimizer step (distributed.row_sparse_value_gradients_).
        self.sparse_gradients = True
        # True while a batch must not count in the codebook statistics (a data-parallel rank's padding
        # example); with a sync hook the rank still takes part in the collectives, with zero statistics.
        self.ema_paused = False

    # ---- key management -------------------------------------------------------------------------------
    def freeze_keys(self) -> None:
        """Stop the EMA (and dead-key restarts); the keys stay as they are in training mode too."""
        self.update_keys = False

    def unfreeze_keys(self) -> None:
        self.update_keys = True

    @torch.no_grad()
    def init_keys_(
        self, queries: torch.Tensor, *, iters: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Set the keys by k-means++ seeding plus `iters` Lloyd iterations (default config.kmeans_iters).

        queries: [N, H, key_dim] pre-bottleneck vectors (e.g. the `.queries` of model outputs), N >= K.
        The EMA state is reset to match: cluster_size = the final cluster sizes, embed_sum consistent
        with keys, so the EMA continues from the k-means solution.
        """
        h, k, d = self.keys.shape
        _require(
            queries.dim() == 3 and tuple(queries.shape[1:]) == (h, d),
            f"queries must have shape [N, {h}, {d}], got {tuple(queries.shape)}",
        )
        _require(queries.shape[0] >= k, f"k-means needs at least num_keys={k} vectors, got {queries.shape[0]}")
        x = queries.detach().to(self.keys.device, torch.float32)
        centers = kmeans_plus_plus(x, k, generator=generator)
        for _ in range(self.config.kmeans_iters if iters is None else iters):
            counts, sums = cluster_stats(x, ops.nearest_key(x, centers)[0], k)
            # An empty cluster keeps its center rather than collapsing to the origin.
            centers = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centers)
        counts, _ = cluster_stats(x, ops.nearest_key(x, centers)[0], k)  # the final centers' cluster sizes
        self._set_codebook(centers, counts)

    def _set_codebook(self, keys: torch.Tensor, cluster_size: torch.Tensor) -> None:
        """Write keys and counts, and the embed_sum that makes ema's keys = embed_sum / smoothed counts hold."""
        self.keys.copy_(keys)
        self.cluster_size.copy_(cluster_size)
        self.embed_sum.copy_(keys * smoothed_cluster_size(self.cluster_size, self.config.eps).unsqueeze(-1))

    def dead_keys(self) -> torch.Tensor:
        """[H, K] bool: keys whose EMA count is below dead_key_threshold times their head's mean count."""
        return self.cluster_size < self.config.dead_key_threshold * self.cluster_size.mean(-1, keepdim=True)

    @torch.no_grad()
    def _ema_step(self, queries: torch.Tensor, index: torch.Tensor) -> None:
        """One EMA step from this batch's queries [N, H, d] and their keys (summed across ranks with a sync
        hook), then dead-key restarts."""
        if self.ema_paused:
            queries, index = queries[:0], index[:0]
        if self.sync is None:
            ops.ema_update_(
                self.keys,
                self.cluster_size,
                self.embed_sum,
                queries,
                index,
                decay=self.config.decay,
                eps=self.config.eps,
            )
            self._restart_dead_keys(queries)
            return
        counts, sums = cluster_stats(queries.float(), index, self.config.num_keys)
        counts, sums, rows_per_rank = self.sync.reduce(counts, sums, queries.shape[0])
        ema_apply_(
            self.keys, self.cluster_size, self.embed_sum, counts, sums, decay=self.config.decay, eps=self.config.eps
        )
        dead = self.dead_keys()
        if bool(dead.any()):  # the same on every rank: the statistics are
            samples = self.sync.restart_samples(queries, rows_per_rank, tuple(dead.shape))
            if samples is not None:
                self._restart_from(samples, dead)

    @torch.no_grad()
    def _restart_dead_keys(self, recent: torch.Tensor) -> None:
        """Move dead keys onto random vectors of `recent` [N, H, d] and give them their head's mean count."""
        dead = self.dead_keys()
        # Off the CPU no early exit: reading dead.any() would wait for the step; restarting no key changes nothing.
        if recent.shape[0] == 0 or (recent.device.type == "cpu" and not bool(dead.any())):
            return
        h, k, _ = self.keys.shape
        rows = torch.randint(recent.shape[0], (h, k), device=recent.device)
        self._restart_from(recent[rows, torch.arange(h, device=recent.device).unsqueeze(1)].float(), dead)

    def _restart_from(self, samples: torch.Tensor, dead: torch.Tensor) -> None:
        """Dead keys [H, K] take the vectors samples [H, K, d] and their head's mean count."""
        h, k = dead.shape
        keys = torch.where(dead.unsqueeze(-1), samples, self.keys)
        counts = torch.where(dead, self.cluster_size.mean(-1, keepdim=True).expand(h, k), self.cluster_size)
        self._set_codebook(keys, counts)

    @torch.no_grad()
    def usage(self) -> dict:
        """Codebook usage from the EMA counts: per-head perplexity [H] and live-key fraction [H]."""
        return codebook_usage(self.cluster_size, dead_key_threshold=self.config.dead_key_threshold)

    # ---- forward ----------------------------------------------------------------------------------------
    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., H, key_dim]."""
        if self.projection is None:
            return vectors.unflatten(-1, (self.config.num_heads, self.key_dim))
        return torch.einsum("...i,hid->...hd", vectors, self.projection.to(vectors.dtype))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BottleneckOutput:
        positions = self._kept_positions(hidden, attention_mask)
        # [N, H, d]; cls pooling keeps each row's first token, taken without a boolean mask (whose indexing
        # waits for the accelerator to count the kept positions), in the same contiguous layout
        queries = self.project(hidden[:, 0].contiguous() if self.config.pooling == "cls" else hidden[positions])
        index, _ = ops.nearest_key(queries.detach(), self.keys)
        heads = torch.arange(self.config.num_heads, device=index.device)
        assigned = self.keys[heads, index]  # [N, H, d]: a copy, so the EMA below cannot disturb autograd
        commitment = (
            (queries.float() - assigned).pow(2).mean()
            if queries.numel()
            else queries.new_zeros((), dtype=torch.float32)
        )
        pooled = self._pooled_values(queries, index, positions)
        if self.training and self.update_keys:
            self._ema_step(queries.detach(), index)
        return BottleneckOutput(
            pooled=pooled,
            queries=queries,
            key_indices=index,
            positions=positions,
            commitment_loss=commitment,
            aux_loss=self.config.commitment_weight * commitment,
        )

    def _pooled_values(self, queries: torch.Tensor, index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The values the lookup selects (or mixes), averaged over heads, then over each row's kept positions."""
        soft = self.training and self.config.soft_temperature is not None
        if soft and not self.config.straight_through:
            return self._per_row(self._soft_values(queries, self.values).mean(1), positions)
        sparse = self.config.sparse_values and self.sparse_gradients
        if sparse and not soft:
            return value_lookup.pooled_values(self.values, index, positions)  # one fused sum, row-sparse gradient
        if sparse:
            head_values = value_lookup.head_values(self.values, index)  # [N, H, value_dim]
        else:
            head_values = self.values[torch.arange(self.config.num_heads, device=index.device), index]
        if soft:
            # Straight-through: the hard values forward (and their exact gradient); the queries get the
            # gradient of the soft assignment, mixing detached values, whose forward contribution cancels out.
            mixed = self._soft_values(queries, self.values.detach())
            head_values = head_values + (mixed - mixed.detach())
        return self._per_row(head_values.mean(1), positions)

    def row_sparse_value_gradient(self) -> bool:
        """Whether one process gives the value table a row-sparse gradient now (see _pooled_values): with
        sparse_values, unless training's soft assignment without straight-through mixes every value."""
        mixes_all = self.training and self.config.soft_temperature is not None and not self.config.straight_through
        return self.config.sparse_values and not mixes_all

    def _per_row(self, vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each batch row's mean of its kept positions' vectors [N, v] -> [B, v]; with cls pooling a row's one
        position is its vector (no host sync)."""
        return vectors if self.config.pooling == "cls" else _mean_per_row(vectors, positions)

    def _kept_positions(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, length = hidden.shape[:2]
        if self.config.pooling == "cls":
            return torch.ones(b, 1, dtype=torch.bool, device=hidden.device)
        if attention_mask is None:
            return torch.ones(b, length, dtype=torch.bool, device=hidden.device)
        return attention_mask.to(torch.bool)

    def _soft_values(self, queries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Values mixed by softmax(-||q - key||^2 / tau) over each head's keys: [N, H, value_dim]."""
        keys = self.keys.clone()  # a snapshot: the EMA updates self.keys in place before backward runs
        q = queries.float()
        sqdist = q.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("nhd,hkd->nhk", q, keys) + keys.pow(2).sum(-1)
        weights = torch.softmax(-sqdist / self.config.soft_temperature, dim=-1)
        return torch.einsum("nhk,hkv->nhv", weights.to(values.dtype), values)


def _mean_per_row(vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Average the kept-position vectors [N, v] of each row of positions [B, T]: [B, v] (0 for empty rows)."""
    rows = positions.nonzero()[:, 0]
    total = vectors.new_zeros(positions.shape[0], vectors.shape[-1]).index_add(0, rows, vectors)
    return total / positions.sum(1, keepdim=True).clamp_min(1).to(total.dtype)


def feature_loss(student_queries: torch.Tensor, teacher_queries: torch.Tensor) -> torch.Tensor:
    """Pull a student's pre-bottleneck vectors toward a teacher's (a constant): mean squared difference.

    Both are the `.queries` [N, H, d] of model outputs on the same batch, so they are aligned position by
    position when the two models keep the same tokens (same tokenizer, same pooling).
    """
    _require(
        student_queries.shape == teacher_queries.shape,
        f"student queries {tuple(student_queries.shape)} and teacher queries "
        f"{tuple(teacher_queries.shape)} differ in shape",
    )
    return (student_queries.float() - teacher_queries.detach().float()).pow(2).mean()


def kmeans_plus_plus(x: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding run for every head at once. x: [N, H, d] float32 -> centers [H, K, d].

    Each new center is drawn with probability proportional to its squared distance to the nearest center
    chosen so far (Arthur & Vassilvitskii, 2007).
    """
    n, h, d = x.shape
    points = x.transpose(0, 1)  # [H, N, d]
    heads = torch.arange(h, device=x.device)
    centers = x.new_empty(h, k, d)
    draws = generator.device if generator is not None else x.device  # a generator draws on its own device
    first = torch.randint(n, (h,), device=draws, generator=generator).to(x.device)
    centers[:, 0] = points[heads, first]
    nearest_sq = (points - centers[:, :1]).pow(2).sum(-1)  # [H, N]
    for j in range(1, k):
        # The tiny floor keeps the draw defined when every point already coincides with a center.
        chosen = _draw_proportional(nearest_sq + torch.finfo(x.dtype).tiny, generator)
        centers[:, j] = points[heads, chosen]
        nearest_sq = torch.minimum(nearest_sq, (points - centers[:, j : j + 1]).pow(2).sum(-1))
    return centers


def _draw_proportional(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One column per row of weights [H, N], drawn with probability proportional to its weight.

    Inverse-CDF sampling: only the H uniforms come from the generator, on the generator's own device, so a
    CPU generator drives draws on CUDA data (torch.multinomial would need the generator on the data's device).
    """
    uniform = torch.rand(
        weights.shape[0],
        1,
        dtype=torch.float64,
        generator=generator,
        device=generator.device if generator is not None else weights.device,
    ).to(weights.device)
    cdf = weights.double().cumsum(-1)
    chosen = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # first column with cdf > u * total
    return chosen.clamp_max(weights.shape[1] - 1).squeeze(1)


def assignment_counts(key_indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """How often each key was chosen: key_indices [N, H] -> counts [H, K] float32."""
    h = key_indices.shape[1]
    flat = (key_indices + torch.arange(h, device=key_indices.device) * num_keys).reshape(-1)
    return torch.bincount(flat, minlength=h * num_keys).view(h, num_keys).float()


def codebook_usage(counts: torch.Tensor, *, dead_key_threshold: float = 0.0) -> dict:
    """Usage of codebooks from per-key counts [H, K] (EMA counts, or assignment_counts of a split).

    perplexity [H]: exp(entropy) of each head's key distribution, between 1 (one key) and K (uniform).
    live_fraction [H]: share of keys whose count exceeds dead_key_threshold times the head's mean
    (with the default 0: keys used at all).
    """
    counts = counts.float()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    entropy = -(probs * probs.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)
    live = counts > dead_key_threshold * counts.mean(-1, keepdim=True)
    return {"perplexity": entropy.exp(), "live_fraction": live.float().mean(-1)}
