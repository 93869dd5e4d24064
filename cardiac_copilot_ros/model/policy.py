"""Guidance head G and the full guidance model (E + G [+ Dreamer I]).

Plane conditioning: a learnable query ``q`` per target plane (``nn.Embedding``, 512-d) is
**concatenated** with the pooled image feature ``f`` (512-d) and fed to G's three fully
connected layers (2048, 512, 6) with ReLU between them. G predicts the action in normalised
units ``(a - action_mean) / action_std``; :class:`GuidanceModel` converts to paper units
(mm, deg) with statistics stored as buffers, so they travel with checkpoints and bundles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cardiac_copilot_ros.model import torch_pose
from cardiac_copilot_ros.model.dreamer import CardiacDreamer
from cardiac_copilot_ros.model.encoder import Encoder

#: Intensity normalisation of the [0, 1] input image (fixed, stored in metadata).
IMAGE_MEAN = 0.5
IMAGE_STD = 0.25


class GuidanceHead(nn.Module):
    """G(f, q): pooled feature (B, C) + plane index (B,) -> normalised action (B, 6).

    With ``uncertainty``, a linear layer on G's last hidden layer (512) also predicts the per-axis
    log Laplace scale ``log b`` in normalised action units (:meth:`forward_scale`).
    """

    def __init__(self, feat_channels: int = 512, n_planes: int = 3, query_dim: int = 512,
                 uncertainty: bool = False) -> None:
        super().__init__()
        self.query = nn.Embedding(n_planes, query_dim)
        nn.init.normal_(self.query.weight, std=0.1)
        self.fc = nn.Sequential(
            nn.Linear(feat_channels + query_dim, 2048), nn.ReLU(inplace=True),
            nn.Linear(2048, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 6))
        self.log_scale = nn.Linear(512, 6) if uncertainty else None
        self.folded = False

    def _first(self, feat: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.fc[0](feat) + self.query(plane)
        return self.fc[0](torch.cat([feat, self.query(plane)], dim=1))

    def forward(self, feat: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        return self.fc[4](self.fc[3](self.fc[2](self.fc[1](self._first(feat, plane)))))

    def forward_scale(self, feat: torch.Tensor, plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised action (B, 6), log Laplace scale in normalised units (B, 6))."""
        log_scale = self.log_scale
        if log_scale is None:
            raise RuntimeError("this guidance head has no uncertainty output")
        h = self.fc[3](self.fc[2](self.fc[1](self._first(feat, plane))))
        return self.fc[4](h), log_scale(h).clamp(min=-9.0, max=6.0)

    @torch.no_grad()
    def fold_plane_query(self) -> None:
        """Inference form (bundles): ``fc0(cat(f, q_p)) = W_f f + (W_q q_p + b)`` with the second
        term a per-plane bias table, so the query half of the first layer's weights (512 x 2048)
        is not stored. Exact up to float rounding; the head cannot be trained afterwards."""
        if self.folded:
            return
        lin = self.fc[0]
        c = lin.in_features - self.query.embedding_dim
        first = nn.Linear(c, lin.out_features, bias=False)
        first.weight.copy_(lin.weight[:, :c])
        plane_bias = self.query.weight @ lin.weight[:, c:].T + lin.bias
        self.fc[0] = first
        self.query = nn.Embedding.from_pretrained(plane_bias.detach().clone(), freeze=True)
        self.folded = True


    @torch.no_grad()
    def unfold_plane_query(self, query_dim: int = 512) -> None:
        """The trainable form of a folded head (from a bundle), with the same outputs: one-hot plane queries
        ``q_p = e_p`` and the query half of the first layer's weights holding each plane's bias
        (``fc0(cat(f, e_p)) = W_f f + bias_p``); fine-tuning then adapts queries and weights as usual."""
        if not self.folded:
            return
        first, table = self.fc[0], self.query.weight.detach()   # (out, c) without bias; (n_planes, out)
        n, out = table.shape
        if n > query_dim:
            raise ValueError(f"{n} planes do not fit a {query_dim}-d one-hot query")
        c = first.in_features
        lin = nn.Linear(c + query_dim, out).to(table)
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[:, :c] = first.weight
        lin.weight[:, c:c + n] = table.T
        query = nn.Embedding(n, query_dim).to(table)
        query.weight.zero_()
        query.weight[torch.arange(n), torch.arange(n)] = 1.0
        self.fc[0], self.query, self.folded = lin, query, False


class GuidanceModel(nn.Module):
    """Policy E + G, with the optional Cardiac Dreamer I.

    ``forward(image, plane, refine)`` is the bundle contract: image float32 (B, 1, H, W) in
    [0, 1], plane int64 (B,), refine -> action (B, 6) in mm/deg. With ``uncertainty``,
    ``forward_with_scale(image, plane, refine)`` -> (B, 12): the same action in columns 0..5 and
    the per-axis Laplace scale b (mm, deg; the expected absolute error) of the policy head in
    columns 6..11 (docs/ARCHITECTURE.md and CONTRACTS: ``has_uncertainty``).
    """

    def __init__(self, backbone: str = "resnet34", n_planes: int = 3, dreamer: bool = True,
                 weights_path: str | Path | None = None, dreamer_dim: int = 256, dreamer_depth: int = 2,
                 dreamer_heads: int = 4, uncertainty: bool = False) -> None:
        super().__init__()
        self.encoder = Encoder(backbone, weights_path)
        c = self.encoder.out_channels
        self.has_uncertainty = bool(uncertainty)
        self.head = GuidanceHead(c, n_planes, uncertainty=uncertainty)
        self.has_dreamer = bool(dreamer)
        self.dreamer = CardiacDreamer(c, n_planes, dreamer_dim, dreamer_depth, dreamer_heads) if dreamer else None
        self.n_planes = n_planes
        self.register_buffer("action_mean", torch.zeros(6))
        self.register_buffer("action_std", torch.ones(6))
        self.image_mean = IMAGE_MEAN
        self.image_std = IMAGE_STD

    # -- normalisation ---------------------------------------------------------------------
    def set_action_stats(self, mean, std) -> None:
        """Store per-axis action statistics (paper units); std is floored at 1e-3."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(6)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(6).clamp(min=1e-3)
        self.action_mean.copy_(mean_t)
        self.action_std.copy_(std_t)

    def normalize_action(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.action_mean) / self.action_std

    def denormalize_action(self, a_norm: torch.Tensor) -> torch.Tensor:
        return a_norm * self.action_std + self.action_mean

    def normalize_image(self, image01: torch.Tensor) -> torch.Tensor:
        return (image01 - self.image_mean) / self.image_std

    # -- pieces used by training -------------------------------------------------------------
    def encode(self, image01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] image -> (feature map, pooled feature)."""
        return self.encoder(self.normalize_image(image01))

    def imagine(self, fmap: torch.Tensor, action_mm_deg: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """Dreamer: the imagined pooled feature after moving by ``action_mm_deg``."""
        dreamer = self.dreamer
        if dreamer is None:
            raise RuntimeError("this model has no Dreamer")
        return dreamer(fmap, self.normalize_action(action_mm_deg), plane)

    # -- the bundle contract ----------------------------------------------------------------
    def forward(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        fmap, feat = self.encode(image)
        action = self.denormalize_action(self.head(feat, plane))
        dreamer = self.dreamer
        if refine and dreamer is not None:
            imagined = dreamer(fmap, self.normalize_action(action), plane)
            residual = self.denormalize_action(self.head(imagined, plane))
            action = torch_pose.compose_actions(action, residual)
        return action

    @torch.jit.export
    def forward_with_scale(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        """(B, 12): ``forward``'s action (mm, deg) and the policy head's Laplace scale b (mm, deg)."""
        fmap, feat = self.encode(image)
        action_n, log_b = self.head.forward_scale(feat, plane)
        action = self.denormalize_action(action_n)
        dreamer = self.dreamer
        if refine and dreamer is not None:
            imagined = dreamer(fmap, self.normalize_action(action), plane)
            residual = self.denormalize_action(self.head(imagined, plane))
            action = torch_pose.compose_actions(action, residual)
        return torch.cat([action, torch.exp(log_b) * self.action_std], dim=1)

    def refine_forward(self, image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """``forward(image, plane, True)`` as a method of its own (for torch.export)."""
        return self.forward(image, plane, True)
