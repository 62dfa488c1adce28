"""Run by tests/test_train.py in a subprocess: train, optionally die by SIGKILL midway."""

import os
import signal
import sys

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(480, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    # stochastic rounding makes the RNG state matter for the weights too
    qd.quantize_(model, qd.QuantConfig(weights=qd.IntFormat(4, stochastic=True)))

    def killer(event, info):
        if mode == "kill" and event == "step" and info["epoch"] == 1 and info["step"] == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    qd.fit(
        qd.supervised(model),
        loader,
        epochs=3,
        lr=1e-2,
        seed=5,
        checkpoint_dir=os.path.join(out, "ckpt"),
        resume=(mode == "resume"),
        progress=False,
        callbacks=[killer],
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(out, "final.safetensors"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
