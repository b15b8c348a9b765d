"""What a DGC network keeps of the dense network it starts from, before any channel is cut:
validation accuracy of the dense checkpoint and of the DGC network loaded from it
(``dgc.load_dense_weights``) at gate progress 0, for the gates' initialisations and norms.

    python bench/dense_start.py --checkpoint bench/out/cifar10_recipe_pretrain/seed0/state.pt \\
        --set data.datadir=/tmp/cifar/cifar10-images --set data.dataset=imagefolder

The data and the family come from the recipe file's trial (--recipe, default the CIFAR-10
recipe; the quickstart's: --recipe experiments/quickstart.yaml --set model.gate_factor=0.5),
so the validation images are the recipe's held-out ones. An untrained saliency
generator scales each kept channel by its saliency: at the paper's initialisation they spread
about 1 +- 0.7 and the ReLU zeroes some, which a dense start does not survive.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

import dgc
from search.train_cmd import trial_config_from_file
from trainables.runner import build_loaders
from trainables.runner import load_state

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {  # name: the DGC network's options (kwargs of dgc.create_model)
    "paper (two norms, gate_init 1)": {"double_norm": True, "gate_init": 1.0},
    "one norm, gate_init 1": {"double_norm": False, "gate_init": 1.0},
    "two norms, gate_init 0.1": {"double_norm": True, "gate_init": 0.1},
    "one norm, gate_init 0.1 (recipe)": {"double_norm": False, "gate_init": 0.1},
}


def accuracy(model: torch.nn.Module, batches) -> float:
    right = seen = 0
    with torch.no_grad():
        for x, y in batches:  # x: (B, 3, H, W)
            right += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    return right / seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a state.pt of the family's dense net")
    ap.add_argument("--recipe", default=str(ROOT / "experiments" / "cifar10_dgc_recipe.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = trial_config_from_file(args.recipe, args.overrides)
    data = build_loaders(cfg, torch.device("cpu"), None, args.threads)
    state = load_state(args.checkpoint)
    state = state.get("model", state)
    dense_name = dgc.variant_of(cfg.model.name, "dense")
    shape = {"num_classes": data.num_classes, "in_chans": data.input_size[0]}
    dense = dgc.create_model(dense_name, **shape)
    dense.load_state_dict(state)
    print(f"{datetime.date.today()} {platform.machine()} torch {torch.__version__}; "
          f"{args.checkpoint}; {cfg.model.name} gate {cfg.model.gate_factor}")  # fmt: skip
    row(f"{dense_name} (the checkpoint)", accuracy(dense.eval(), data.val.epoch()))
    for name, kwargs in OPTIONS.items():
        torch.manual_seed(0)
        model = dgc.create_model(
            cfg.model.name, gate_factor=cfg.model.gate_factor, **shape, **kwargs
        )
        dgc.load_dense_weights(model, state)
        dgc.set_progress(model, 0.0)  # every channel kept
        row(f"{cfg.model.name}, {name}", accuracy(model.eval(), data.val.epoch()))


def row(name: str, acc: float) -> None:
    print(f"| {name} | {100 * acc:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
