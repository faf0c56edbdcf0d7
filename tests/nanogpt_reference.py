"""nanoGPT as the tests meet it: its GPT model and what its train.py and sample.py do with a ``ckpt.pt``.

An independent reproduction of the published source it is checked against: nanoGPT,
https://github.com/karpathy/nanoGPT (model.py, train.py, sample.py), MIT License, Copyright (c) 2022
Andrej Karpathy. Written anew for these tests, not copied: the same module and parameter names
(``transformer.wte``, ``wpe``, ``h.N.ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``,
``mlp.c_proj``, ``ln_f``, ``lm_head`` tied to ``wte``), the optional biases, the two AdamW parameter
groups of ``configure_optimizers``, the checkpoint dict train.py saves, and its ``--init_from=resume``
steps in their order. Left out, since no test needs them: dropout, generation, DDP, mixed precision,
the learning-rate schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

COMPILE_PREFIX = "_orig_mod."  # what torch.compile puts before every key of a compiled model's state dict
FORCED_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # resume takes these from the file


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """Layer norm whose bias can be absent (``bias=False`` models have none anywhere)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v side by side
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)

        q, k, v = (heads(y) for y in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
                "wpe": nn.Embedding(cfg.block_size, cfg.n_embd),
                "h": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                "ln_f": LayerNorm(cfg.n_embd, cfg.bias),
            }
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer["wte"].weight = self.lm_head.weight  # tied: one parameter under two names
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy of ``idx`` against ``targets``."""
        tr = self.transformer
        x = tr["wte"](idx) + tr["wpe"](torch.arange(idx.shape[1], device=idx.device))
        for block in tr["h"]:
            x = block(x)
        logits = self.lm_head(tr["ln_f"](x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW over two groups: parameters of 2 or more dimensions (matmul weights, embeddings) decay,
        the others (biases, layer-norm weights) do not; fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]  # each tied parameter once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One iteration of train.py's loop, without gradient accumulation: forward, backward, clip to 1, step."""
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def checkpoint(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    iter_num: int,
    best_val_loss: torch.Tensor,
    config: dict[str, object],
    *,
    compiled: bool = False,
) -> dict[str, object]:
    """The dict train.py saves as ``ckpt.pt``; ``compiled``: as a torch.compile'd model's state dict names
    its keys (train.py saves it as it is)."""
    state = model.state_dict()
    if compiled:
        state = {COMPILE_PREFIX + k: v for k, v in state.items()}
    return {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "model_args": asdict(model.config),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": config,
    }


@dataclass
class Resumed:
    model: GPT
    optimizer: torch.optim.AdamW
    iter_num: int
    best_val_loss: object


def _strip_compile_prefix(state: dict[str, torch.Tensor]) -> None:
    for k in list(state):
        if k.startswith(COMPILE_PREFIX):
            state[k[len(COMPILE_PREFIX) :]] = state.pop(k)


def resume(
    out_dir: Path,
    *,
    model_args: dict[str, object] | None = None,
    weight_decay: float = 0.1,
    learning_rate: float = 6e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    device: str = "cpu",
) -> Resumed:
    """train.py ``--init_from=resume``: its steps in order, each entry read the way it reads it (a missing
    one is the KeyError train.py stops with). ``model_args``: what its command line would give."""
    ckpt = torch.load(Path(out_dir) / "ckpt.pt", map_location=device)  # torch's default weights_only, as train.py
    args = dict(model_args or {"dropout": 0.0})
    for k in FORCED_ARGS:
        args[k] = ckpt["model_args"][k]
    model = GPT(GPTConfig(**args))  # type: ignore[arg-type]
    state = ckpt["model"]
    _strip_compile_prefix(state)
    model.load_state_dict(state)
    iter_num = ckpt["iter_num"]
    best_val_loss = ckpt["best_val_loss"]
    model.to(device)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, betas, device)
    optimizer.load_state_dict(ckpt["optimizer"])
    return Resumed(model, optimizer, iter_num, best_val_loss)


def load_for_sampling(out_dir: Path, device: str = "cpu") -> GPT:
    """sample.py ``--init_from=resume``: the model from ``model_args`` and ``model`` only."""
    ckpt = torch.load(Path(out_dir) / "ckpt.pt", map_location=device)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = ckpt["model"]
    _strip_compile_prefix(state)
    model.load_state_dict(state)
    return model
