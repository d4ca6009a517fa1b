"""Fine-tuning steps in PyTorch: the torch backend's `vit_core.finetune.Training`.

`vit_core.finetune` decides the recipe (schedule, parameter groups, data, seeds); this
module takes the steps: `torch.optim.AdamW` over timm-style parameter groups, each
group's learning rate the step's times its `lr_scale`; cross-entropy with label
smoothing (`F.cross_entropy(label_smoothing=)`); dropout and drop-path masks from a
seed per (step, rank). Under torchrun the processes form a gloo group and the model is
wrapped in `DistributedDataParallel`, which averages the gradients of the processes'
equal shares of each batch during `backward`: every process then takes the step one
process would take on the whole batch. The Flax twin is `vit_flax/training.py`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from vit_core.finetune import MOMENTS, Launch, ParamGroup, Processes, Recipe, step_seed
from vit_torch.backend import build
from vit_torch.modeling import ViTForImageClassification
from vit_torch.weights import internal_weights


def start_processes(launch: Launch) -> Processes:
    """The process group torchrun started (gloo: the model trains on the CPU), or one
    process alone."""
    if launch.world == 1:
        return Processes(0, 1, "one process")
    dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world)
    return Processes(
        dist.get_rank(),
        dist.get_world_size(),
        f"DistributedDataParallel over {launch.world} processes (gloo)",
        barrier=dist.barrier,
        close=dist.destroy_process_group,
    )


def trainer(model: ViTForImageClassification, recipe: Recipe, processes: Processes) -> Trainer:
    return Trainer(model, recipe, processes)


class Trainer:
    """AdamW on a `ViTForImageClassification`, data-parallel over `processes`."""

    def __init__(
        self, model: ViTForImageClassification, recipe: Recipe, processes: Processes
    ) -> None:
        self.device = next(model.parameters()).device
        rate = recipe.drop_path_rate
        if rate is not None and rate != model.config.drop_path_rate:
            # Drop path holds no weights: the same weights in a model built at that rate.
            config = dataclasses.replace(model.config, drop_path_rate=rate)
            model = build(config, model.kind, internal_weights(model), device=self.device)
        if recipe.grad_checkpointing:
            model.gradient_checkpointing_enable()
        self.model, self.recipe, self.processes = model, recipe, processes
        self.config, self.kind = model.config, model.kind
        self.net: torch.nn.Module = DistributedDataParallel(model) if processes.world > 1 else model
        self.names = {p: name for name, p in model.named_parameters()}
        groups = recipe.groups({name: tuple(p.shape) for p, name in self.names.items()})
        members: dict[ParamGroup, list[torch.nn.Parameter]] = defaultdict(list)
        for p, name in self.names.items():
            members[groups[name]].append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": ps, "lr_scale": g.lr_scale, "weight_decay": g.weight_decay}
                for g, ps in members.items()
            ],
            lr=0.0,  # set before every step from the schedule
            betas=recipe.betas,
            eps=recipe.eps,
        )

    def step(self, pixels: np.ndarray, labels: np.ndarray, lr: float, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(step_seed(self.recipe.seed, step, self.processes.rank))
        self.net.train()
        logits = self.net(torch.from_numpy(pixels).to(self.device)).logits
        target = torch.from_numpy(labels).to(self.device)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.recipe.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        mean = loss.detach()
        if self.processes.world > 1:  # the global batch's loss: the mean of the shares'
            dist.all_reduce(mean)
            mean /= self.processes.world
        return float(mean)

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        self.model.eval()
        out = self.model(torch.from_numpy(pixels).to(self.device)).logits
        return out.float().cpu().numpy()

    def weights(self) -> dict[str, np.ndarray]:
        return internal_weights(self.model)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        out = {}
        for p, name in self.names.items():
            state = self.optimizer.state.get(p, {})  # empty before the first step
            for moment in MOMENTS:
                if moment in state:
                    out[f"{moment}.{name}"] = state[moment].detach().float().cpu().numpy()
        return out

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray], step: int) -> None:
        for p, name in self.names.items():
            moments: dict[str, Any] = {
                m: torch.from_numpy(np.array(arrays[f"{m}.{name}"], np.float32)).to(p)
                for m in MOMENTS
            }
            # torch keeps the step count per parameter, as a float32 tensor
            self.optimizer.state[p] = {"step": torch.tensor(float(step)), **moments}
