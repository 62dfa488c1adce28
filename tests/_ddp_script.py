"""Run by tests/test_distributed.py: the same tiny quantized distillation, in one process or
in ``world`` gloo processes (torch.multiprocessing), final weights saved per rank.

    python tests/_ddp_script.py OUT single QUANT EPOCHS [resume]
    python tests/_ddp_script.py OUT ddp QUANT EPOCHS [resume|kill] WORLD
    python tests/_ddp_script.py OUT fsdp QUANT EPOCHS [resume] WORLD     (FSDP2 fully_shard)

``kill``: the last rank dies by SIGKILL at epoch 2, step 2 (after the epoch-1 checkpoint).

QUANT ``static``: int4 weights, int8 activations with static ranges calibrated by each rank on
*its own* data (a different slice per rank), so the ranks start with different quantizer
buffers and DDP must broadcast rank 0's. QUANT ``lsq``: int4 weights with learned steps (LSQ
parameters, all-reduced like the weights). The 1-process reference calibrates on rank 0's slice
and reads the data in the order of a DistributedSampler with one replica (same seed): the
global batches the ranks share out between them.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

import qdistill as qd  # noqa: E402

SEED, BATCH = 3, 16


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return TensorDataset(x, y)


def models(calibration: torch.Tensor, quant: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3))
    torch.manual_seed(2)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    if quant == "static":
        cfg = qd.QuantConfig(weights=qd.IntFormat(4), activations=qd.IntFormat(8))
    else:
        cfg = qd.QuantConfig(weights=qd.IntFormat(4, symmetric=True), lsq=True)
    qd.quantize_(student, cfg)
    qd.calibrate(student, [calibration], num_batches=1, progress=False)
    return teacher, student


def train(
    out: str,
    loader: DataLoader,
    calibration: torch.Tensor,
    quant: str,
    epochs: int,
    resume: bool,
    callbacks: list | None = None,
    strategy: str | None = None,
) -> nn.Module:
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's lazy imports, not timed
    teacher, student = models(calibration, quant)
    t = time.perf_counter()
    run = qd.distill(teacher, student, loss=qd.KD(temperature=2.0, alpha=0.5))
    qd.fit(
        run,
        loader,
        epochs=epochs,
        # 64 examples in batches of 10: under torchrun each rank counts 32 of them
        val_loader=DataLoader(data(), batch_size=10),
        lr=1e-2,
        seed=SEED,
        clip_grad_norm=1.0,
        checkpoint_dir=os.path.join(out, "ckpt"),
        resume=resume,
        progress=False,
        desc="student",
        callbacks=callbacks,
        strategy=strategy,
    )
    print(
        f"fit seconds, world size {os.environ.get('WORLD_SIZE', 1)}: {time.perf_counter() - t:.3f}"
    )
    return student


def save(student: nn.Module, path: str) -> None:
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, path)


def single(out: str, quant: str, epochs: int, resume: bool) -> None:
    torch.set_num_threads(1)
    ds = data()
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    student = train(out, loader, ds.tensors[0][:32], quant, epochs, resume)
    save(student, os.path.join(out, "single.safetensors"))


def killer(event: str, info: dict) -> None:
    if event == "step" and info["epoch"] == 1 and info["step"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def worker(
    rank: int, world: int, out: str, port: int, quant: str, epochs: int, mode: str, strategy: str
):
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    ds = data()
    own = ds.tensors[0][32 * rank : 32 * rank + 32]  # each rank calibrates on other data
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True)
    kill = [killer] if mode == "kill" and rank == world - 1 else None
    student = train(out, loader, own, quant, epochs, mode == "resume", kill, strategy)
    save(student, os.path.join(out, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out, mode, quant, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    resume = "resume" in sys.argv[5:]
    mode = sys.argv[5] if len(sys.argv) > 6 else ""
    os.makedirs(out, exist_ok=True)
    if mode == "single":
        single(out, quant, epochs, resume)
    else:
        world = int(sys.argv[-1])
        # fork: the ranks inherit the imported torch and qdistill (no torch op ran before)
        torch.multiprocessing.start_processes(
            worker,
            args=(world, out, free_port(), quant, epochs, mode, sys.argv[2]),
            nprocs=world,
            join=True,
            start_method="fork",
        )
