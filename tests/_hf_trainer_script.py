"""Run by tests/test_hf_trainer.py (in-process, or under ``accelerate launch`` with 2 CPU
processes): distil a tiny BERT teacher into a tiny int4 BERT student with qd.DistillTrainer.

    python tests/_hf_trainer_script.py OUT PER_DEVICE_BATCH

Every rank saves its final student state to ``OUT/rank{R}.safetensors``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import qdistill as qd  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiny_transformers import bert_config  # noqa: E402

VOCAB, LENGTH, CLASSES = 40, 8, 3
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class Tokens(torch.utils.data.Dataset):
    """Token sequences whose label is (number of ids below VOCAB/2) mod 3, padded at the end."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = (((self.ids < VOCAB // 2) & (self.mask > 0)).sum(1) % CLASSES).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    common = {"vocab_size": VOCAB, "max_position_embeddings": 16, "num_labels": CLASSES}
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(
        bert_config(transformers, 32, **common, **NO_DROPOUT)
    )
    torch.manual_seed(1)
    student = transformers.BertForSequenceClassification(
        bert_config(transformers, 16, **common, **NO_DROPOUT)
    )
    return teacher, student


QUANT = qd.QuantConfig(weights=qd.IntFormat(4, group_size=16), rules={"classifier": None})


def trainer(out: str, batch: int, steps: int = 4) -> qd.DistillTrainer:
    teacher, student = models()
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
    )
    return qd.DistillTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=Tokens(),
        loss=qd.KD(temperature=2.0, alpha=0.5),
        quant_config=QUANT,
    )


if __name__ == "__main__":
    out, batch = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    t = trainer(out, batch)
    t.train()
    rank = t.args.process_index
    state = {k: v.contiguous() for k, v in t.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    print(f"rank {rank} of {t.args.world_size}: losses {losses}")
