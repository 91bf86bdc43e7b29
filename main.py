"""The prototype's training script, now a thin wrapper over ossgpt: train a model on a train and an eval text file.

    python main.py --train_data train.txt --eval_data eval.txt --num_epochs 3 --batch_size 1 --grad_accum_steps 8 \
        --learning_rate 3e-4 --warmup_steps 500 --gradient_checkpointing
    torchrun --nproc_per_node=2 main.py ...                     (the same, data parallel over 2 processes)
    python main.py ... --preset tiny --max_steps 50 --seq_len 256      (a short CPU run)

The text files are tokenized into OUT_DIR/data (ossgpt.data.prepare.prepare_train_eval) and the model trains into
OUT_DIR with `ossgpt train`'s trainer; OUT_DIR/checkpoint then works with `ossgpt eval` and `ossgpt generate`.
As in the prototype, --batch_size counts sequences per process. --num_epochs sets the number of steps from the training
tokens; --max_steps, if given, wins. Options left out take the preset's defaults (see `ossgpt train --help`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ossgpt.config import GPTOSSConfig
from ossgpt.data.prepare import prepare_train_eval, read_meta
from ossgpt.errors import UserError
from ossgpt.training import TrainConfig, distributed, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_data", required=True, help="training text file")
    parser.add_argument("--eval_data", required=True, help="evaluation text file (unseen text)")
    parser.add_argument("--num_epochs", type=float, default=None, help="passes over the training tokens")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides --num_epochs)")
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per micro-step, per process")
    parser.add_argument("--grad_accum_steps", type=int, default=None, help="micro-steps per optimizer step")
    parser.add_argument("--learning_rate", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up steps")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (less memory)")
    parser.add_argument("--preset", default="mini", help="model preset (default: mini, the prototype's model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the preset's)")
    parser.add_argument("--out_dir", default="runs/main", help="run folder (default: runs/main)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    out_dir, world_size = Path(args.out_dir), int(os.environ.get("WORLD_SIZE", "1"))
    data_dir = out_dir / "data"
    per_process_batch = {"batch_size": args.batch_size * world_size} if args.batch_size is not None else {}
    if args.num_epochs is not None and not args.num_epochs > 0:
        raise UserError(f"--num_epochs must be positive, got {args.num_epochs}")
    given = {
        name: getattr(args, name)
        for name in ("max_steps", "grad_accum_steps", "learning_rate", "warmup_steps", "seq_len")
        if getattr(args, name) is not None
    }
    preset_tokenizer = GPTOSSConfig.from_preset(args.preset).tokenizer
    tokenizer = args.tokenizer or preset_tokenizer
    config = TrainConfig.for_preset(
        args.preset,
        data=str(data_dir),
        out=str(out_dir),
        distributed="ddp" if world_size > 1 else "none",
        resume=args.resume,
        force=not args.resume,  # as the prototype did, a new run replaces the previous one
        gradient_checkpointing=args.gradient_checkpointing,
        model_override=[] if tokenizer == preset_tokenizer else [f"tokenizer={tokenizer}"],
        **per_process_batch,
        **given,
    )  # checks every value before the (slow) tokenizing
    ctx = distributed.setup(config.distributed, config.device)
    if ctx.is_main and not (args.resume and data_dir.is_dir()):
        prepare_train_eval([args.train_data], [args.eval_data], data_dir, tokenizer)
    ctx.barrier()
    if args.num_epochs is not None and args.max_steps is None:
        steps = math.ceil(args.num_epochs * read_meta(data_dir)["train_tokens"] / config.tokens_per_step)
        config.max_steps = max(1, steps)
    train(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
