"""``python -m advisor.tune``: train once on the composed config and report the losses."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from advisor.config import build_network, load_datasets, train_settings
from advisor.errors import exit_on_config_error
from advisor.train import evaluate, sgd


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    s = train_settings(cfg)
    seeds = [int(cfg.seed)]
    (ds,) = load_datasets(cfg, seeds)
    net = build_network(cfg, [ds], float(cfg.model.sigma_w), seeds, dtype=s.dtype)
    x, y = ds.x_train.to(s.device, s.dtype), ds.y_train.to(s.device, s.dtype)
    result = sgd(
        net, x, y, ds.labels_train, s.lr, s.batch_size, s.steps, seeds, s.loss,
        s.momentum, s.weight_decay, s.blowup, progress="train",
    )
    if result.diverged[0]:
        print(f"diverged at step {int(result.diverged_at[0])} (lr={s.lr}, sigma_w={cfg.model.sigma_w})")
        return
    train_loss, train_acc = evaluate(result.network, x, y, ds.labels_train, s.loss)
    val_loss, val_acc = evaluate(
        result.network, ds.x_val.to(s.device, s.dtype), ds.y_val.to(s.device, s.dtype), ds.labels_val, s.loss
    )
    line = f"train loss {train_loss[0]:.4f}  validation loss {val_loss[0]:.4f}"
    if val_acc is not None:
        line += f"  train accuracy {train_acc[0]:.3f}  validation accuracy {val_acc[0]:.3f}"
    print(line)


if __name__ == "__main__":
    main()
