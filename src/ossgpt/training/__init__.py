"""Training: `train(TrainConfig.for_preset("tiny", data=..., out=...))`, on one process or many (torchrun);
fine-tuning to chat: `sft(SFTConfig.create(checkpoint=..., data="chats.jsonl", out=...))`.

config.py       TrainConfig (every field an `ossgpt train` flag, unset ones from the preset), the model to train
data.py         training windows in shuffled epochs, fixed validation windows, from a prepared data folder
optim.py        the optimizer's parameter groups and the warm-up + cosine learning-rate schedule
muon.py         Muon (orthogonalised momentum) for the hidden matrices, AdamW for the rest
trainer.py      the loop: accumulation, autocast, clipping, NaN skipping, evaluation, saving by steps and time
checkpoint.py   RUN_DIR/checkpoint: atomic saves of model, optimizer and trainer state; exact resume
distributed.py  torchrun process groups, DDP / FSDP2 wrapping, per-block torch.compile
logger.py       train.log, metrics.jsonl, loss.png, progress bar
sft_data.py     supervised fine-tuning data: JSONL conversations -> Harmony tokens and labels -> packed windows
sft.py          SFTConfig and SFTTrainer: the trainer on conversations, with LoRA adapters or every weight
"""

from ossgpt.training.config import TrainConfig
from ossgpt.training.sft import SFTConfig, sft
from ossgpt.training.trainer import train

__all__ = ["SFTConfig", "TrainConfig", "sft", "train"]
